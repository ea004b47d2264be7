"""Calibrate the guard's verdicts: false alarms on correct fused paths, and the smallest fault it flags.

    python benchmarks/calibrate_guard.py false-alarms --checks 2000 --out runs/calibration/false_alarms.json
    python benchmarks/calibrate_guard.py power --out runs/calibration/power.json

``false-alarms`` runs ``check_seam`` on correct fused paths (ce_guard's fused layer, and
``F.linear_cross_entropy`` where torch has it) over a grid of dtype, vocab size and token count, with
fresh random inputs per check, and counts drift verdicts (the target is zero). It also records how
close each error came to its budget (``err / budget``), the margin that says how the budget scales.

``power`` injects each fault at growing magnitude into ce_guard's fused layer and reports the smallest
magnitude the guard flags at the first check, and the cause it names.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import Counter
from pathlib import Path

import torch

from ce_guard import CEContract, SeamOutputs, SeamRecord, check_seam
from ce_guard.fused import FusedLinearCrossEntropy


def run_fused(layer: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> SeamOutputs:
    h = hidden.detach().requires_grad_()
    layer.weight.grad = None
    loss = layer(h, targets) * scale
    loss.backward()
    return SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=layer.weight.grad)


def inputs(n: int, d: int, v: int, dtype: torch.dtype, device: str, seed: int, pad: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device, dtype)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5 * 2).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < pad] = -100
    return hidden, torch.nn.Parameter(weight), targets.to(device)


def paths(d: int, v: int, weight: torch.nn.Parameter) -> dict[str, torch.nn.Module]:
    contract = CEContract(vocab_size=v)
    out = {"ce_guard_fused": FusedLinearCrossEntropy(d, contract, weight=weight)}
    # torch 2.13's chunked path returns a wrong bf16 loss on CPU (tests/test_adapters_in_the_wild.py): it is
    # not a correct path there, so only its fp32 runs count towards false alarms.
    if hasattr(torch.nn.functional, "linear_cross_entropy") and (weight.dtype == torch.float32 or weight.is_cuda):
        from ce_guard.adapters import TorchLinearCrossEntropy

        out["torch_linear_cross_entropy"] = TorchLinearCrossEntropy(d, v, weight=weight)
    return out


def false_alarms(args) -> dict:
    grid = list(itertools.product(args.dtypes, args.vocab, args.tokens))
    verdicts: Counter = Counter()
    margins: dict[str, list[float]] = {}
    rows = []
    checks, seed, started = 0, 0, time.time()
    while checks < args.checks:
        for dtype_name, v, n in grid:
            dtype = getattr(torch, dtype_name)
            hidden, weight, targets = inputs(n, args.hidden, v, dtype, args.device, seed)
            seed += 1
            for name, layer in paths(args.hidden, v, weight).items():
                fused = run_fused(layer, hidden, targets)
                record = SeamRecord(hidden=hidden, weight=weight.detach(), targets=targets, fused=fused, upstream=1.0)
                result = check_seam(record, layer.ce_contract)
                r, b = result.report, result.report.budget
                key = f"{name}/{dtype_name}/V={v}/N={n}"
                verdicts[result.diagnosis.cause.value] += 1
                margins.setdefault(key, []).append(max(r.loss_rel_err / b.loss_rel,
                                                       (r.grad_hidden_rel_err or 0) / b.grad_hidden_rel,
                                                       (r.grad_weight_rel_err or 0) / b.grad_weight_rel))
                if result.diagnosis.drift:
                    rows.append({"key": key, "seed": seed, "summary": result.diagnosis.summary})
                checks += 1
        print(f"{checks} checks, {sum(v for k, v in verdicts.items() if k != 'within_budget')} drift,"
              f" {time.time() - started:.0f}s", flush=True)
    worst = {k: {"max_err_over_budget": max(m), "median": sorted(m)[len(m) // 2], "checks": len(m)}
             for k, m in margins.items()}
    return {"checks": checks, "verdicts": dict(verdicts), "false_alarms": rows, "margins": worst,
            "device": _device(args.device), "torch": torch.__version__}


def power(args) -> dict:
    n, d, v = args.tokens[0], args.hidden, args.vocab[0]
    results = []

    def first_flag(label, magnitudes, build):
        for magnitude in magnitudes:
            contract, fault_kwargs, scale, dtype = build(magnitude)
            hidden, weight, targets = inputs(n, d, v, dtype, args.device, seed=7, pad=fault_kwargs.pop("pad", 0.05))
            layer = FusedLinearCrossEntropy(d, contract, weight=weight, **fault_kwargs)
            fused = run_fused(layer, hidden, targets, scale)
            # The scale sits inside the seam: the fused loss and its gradients carry it, the upstream is 1.
            result = check_seam(SeamRecord(hidden=hidden, weight=weight.detach(), targets=targets, fused=fused,
                                           upstream=1.0), contract)
            results.append({"fault": label, "magnitude": magnitude, "flagged": result.diagnosis.drift,
                            "cause": result.diagnosis.cause.value, "summary": result.diagnosis.summary})
            print(label, magnitude, result.diagnosis.cause.value, flush=True)

    plain = CEContract(vocab_size=v)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        # A loss/gradient scale of (1 + delta) applied inside the seam (the upstream stays 1).
        first_flag(f"gradient scale 1+delta ({dtype_name})", [1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3],
                   lambda m, dt=dtype: (plain, {}, 1.0 + m, dt))
        first_flag(f"bf16 accumulators by token chunk ({dtype_name})", [n, n // 4, n // 16, n // 64, max(n // 256, 1)],
                   lambda m, dt=dtype: (plain, {"fault": "bf16_accumulators", "token_chunk": m}, 1.0, dt))
        first_flag(f"missing z-loss coefficient ({dtype_name})", [1e-7, 1e-6, 1e-5, 1e-4, 1e-3],
                   lambda m, dt=dtype: (CEContract(vocab_size=v, z_loss=m), {"fault": "missing_z_loss"}, 1.0, dt))
        first_flag(f"padding in the denominator, pad fraction ({dtype_name})", [0.001, 0.003, 0.01, 0.03, 0.1],
                   lambda m, dt=dtype: (plain, {"fault": "ignore_in_denominator", "pad": m}, 1.0, dt))
    return {"tokens": n, "hidden": d, "vocab": v, "results": results, "device": _device(args.device),
            "torch": torch.__version__}


def _device(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["false-alarms", "power"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checks", type=int, default=2000)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--vocab", nargs="+", type=int, default=[32768])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = false_alarms(args) if args.mode == "false-alarms" else power(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k in ("checks", "verdicts")}))


if __name__ == "__main__":
    main()
