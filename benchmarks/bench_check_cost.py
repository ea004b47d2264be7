"""What the verdict's statistics cost inside one check: the budget, and the signature fit a flagged check adds.

A check runs the reference, earns the budget on the native path, compares and diagnoses. A check over budget
also fits dL/dh's error onto the faults' directions and the native path's rounding (two matmuls over at most
2,048 tokens, collectives over TP). Timed side by side on one batch of ce_guard's fused layer: a clean check, the same check with a 1.002x
scale (over budget, so it fits), the fit alone and the budget alone; medians of ``--repeats``.

    python benchmarks/bench_check_cost.py --out runs/check_cost.json                 # GPU shape on CUDA
    python benchmarks/bench_check_cost.py --shape 2048x128x32768 --out runs/check_cost_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from bench_output_layer import time_ms
from ce_guard import CEContract, SeamOutputs, SeamRecord, check_seam
from ce_guard.faults import SeamFault
from ce_guard.fused import FusedLinearCrossEntropy
from ce_guard.parity import native_error_budget
from ce_guard.reference import reference_linear_cross_entropy
from ce_guard.signature import fit_signatures


def record_of(layer: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> SeamRecord:
    h = hidden.detach().requires_grad_()
    layer.weight.grad = None
    loss = layer(h, targets)
    loss.backward()
    fused = SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=layer.weight.grad)
    return SeamRecord(hidden=hidden, weight=layer.weight.detach(), targets=targets, fused=fused, upstream=1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16384x4096x151936", help="NxDxV")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    n, d, v = (int(x) for x in args.shape.split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, d, generator=gen, device=device).to(dtype)
    weight = nn.Parameter((torch.randn(v, d, generator=gen, device=device) * (2 / d ** 0.5)).to(dtype))
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    targets[::17] = -100
    contract = CEContract(vocab_size=v)
    clean = record_of(FusedLinearCrossEntropy(d, contract, weight=weight), hidden, targets)
    scaled = record_of(FusedLinearCrossEntropy(d, contract, weight=weight, fault=SeamFault.GRAD_SCALE,
                                               fault_scale=1.002), hidden, targets)
    reference = reference_linear_cross_entropy(hidden, weight.detach(), targets, contract)

    def fit():
        return fit_signatures(hidden, weight.detach(), targets, scaled.fused.grad_hidden, reference.grad_hidden,
                              reference.token_weight, contract)

    timings = {
        "clean check": lambda: check_seam(clean, contract),
        "flagged check (fit included)": lambda: check_seam(scaled, contract),
        "signature fit alone": fit,
        "budget alone": lambda: native_error_budget(hidden, weight.detach(), targets, contract, sample_tokens=256),
    }
    ms = {name: time_ms(fn, device, warmup=1, repeats=args.repeats) for name, fn in timings.items()}
    flagged = check_seam(scaled, contract)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "shape": {"tokens": n, "hidden": d, "vocab": v}, "dtype": args.dtype, "ms": ms,
              "fit_share_of_clean_check": ms["signature fit alone"] / ms["clean check"],
              "budget_share_of_clean_check": ms["budget alone"] / ms["clean check"],
              "flagged_cause": flagged.diagnosis.cause.value, "flagged_summary": flagged.diagnosis.summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
