"""What the verdict's statistics cost inside one check: the budget, and the signature fit a flagged check adds.

A check runs the reference, earns the budget on the native path, compares and diagnoses. A check over budget
also fits dL/dh's error onto the faults' directions and the native path's rounding (two matmuls over at most
2,048 tokens, collectives over TP). Timed side by side on one batch of ce_guard's fused layer: a clean check, the same check with a 1.002x
scale (over budget, so it fits), the fit alone and the budget alone; medians of ``--repeats``.

    python benchmarks/bench_check_cost.py --out runs/check_cost.json                 # GPU shape on CUDA
    python benchmarks/bench_check_cost.py --shape 2048x128x32768 --out runs/check_cost_cpu.json

``--count-ops`` counts the aten ops one clean check dispatches, a proxy for its host time (each op is a
launch on CUDA), with each block function that runs compiled on CUDA counted as one call; on CPU each matmul
adds two upcasts CUDA does not run. ``--chunk-elements`` sets the reference's block, so that a small CPU
shape runs as many blocks as a GPU one (1024x32x12544 with 1048576: the 13 blocks of 8192x1024x100352).

    python benchmarks/bench_check_cost.py --shape 1024x32x12544 --chunk-elements 1048576 --count-ops \
        --repeats 1 --out runs/check_ops.json

``--profile`` then profiles one clean check and one signature fit: the device's busy time against the wall
time (a check the device idles through is bound by the host), the top CUDA kernels and host ops, and the host
syncs of one more call.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
import warnings
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench_example_speed import kernel_report, sync_report
from bench_output_layer import time_ms
from ce_guard import CEContract, SeamOutputs, SeamRecord, check_seam, parity, reference, signature
from ce_guard.fused import FusedLinearCrossEntropy
from ce_guard.budget import native_error_budget
from ce_guard.reference import DEFAULT_CHUNK_ELEMENTS, reference_linear_cross_entropy
from ce_guard.signature import fit_signatures
from ce_guard.testing import FaultyFusedLinearCrossEntropy


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
    parser.add_argument("--profile", action="store_true", help="profile one clean check and one fit (CUDA)")
    parser.add_argument("--count-ops", action="store_true", help="count the aten ops of one clean check")
    parser.add_argument("--chunk-elements", type=int, default=DEFAULT_CHUNK_ELEMENTS,
                        help="the reference's logits per block (how many blocks a check runs)")
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
    scaled = record_of(FaultyFusedLinearCrossEntropy(d, contract, weight=weight, fault="grad_scale",
                                                     fault_scale=1.002), hidden, targets)
    reference = reference_linear_cross_entropy(hidden, weight.detach(), targets, contract)

    def fit():
        return fit_signatures(hidden, weight.detach(), targets, scaled.fused.grad_hidden, reference.grad_hidden,
                              reference.token_weight, contract)

    chunk = args.chunk_elements
    timings = {
        "clean check": lambda: check_seam(clean, contract, chunk_elements=chunk),
        "flagged check (fit included)": lambda: check_seam(scaled, contract, chunk_elements=chunk),
        "signature fit alone": fit,
        "budget alone": lambda: native_error_budget(hidden, weight.detach(), targets, contract, sample_tokens=256),
    }
    ms = {name: time_ms(fn, device, warmup=1, repeats=args.repeats) for name, fn in timings.items()}
    flagged = check_seam(scaled, contract, chunk_elements=chunk)
    profiled = ("clean check", "signature fit alone") if args.profile and device.type == "cuda" else ()
    profile = "\n".join(profile_check(timings[name], name) for name in profiled) or None
    ops = count_ops(timings["clean check"]) if args.count_ops else None
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "shape": {"tokens": n, "hidden": d, "vocab": v}, "dtype": args.dtype, "ms": ms,
              "fit_share_of_clean_check": ms["signature fit alone"] / ms["clean check"],
              "budget_share_of_clean_check": ms["budget alone"] / ms["clean check"],
              "flagged_cause": flagged.diagnosis.cause.value, "flagged_summary": flagged.diagnosis.summary,
              "ops_per_clean_check": None if ops is None else sum(ops.values()),
              "ops_by_name": None if ops is None else dict(ops.most_common()), "profile": profile}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("profile", "ops_by_name")}, indent=1))
    if profile:
        print(profile)


def count_ops(check) -> collections.Counter:
    """The aten ops one call of ``check`` dispatches, by name; a block function that runs compiled on CUDA
    counts as one call, not as the ops its eager version dispatches."""
    counts: collections.Counter = collections.Counter()
    inside_block = [False]

    def as_one_call(fn, device):
        def call(*args):
            counts[f"compiled {fn.__name__}"] += 1
            inside_block[0] = True
            try:
                return fn(*args)
            finally:
                inside_block[0] = False
        return call

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside_block[0]:
                counts[str(func)] += 1
            return func(*args, **(kwargs or {}))

    with mock.patch.object(reference, "compiled_on_cuda", as_one_call), \
            mock.patch.object(parity, "compiled_on_cuda", as_one_call), \
            mock.patch.object(signature, "compiled_on_cuda", as_one_call), Count():
        check()
    return counts


def profile_check(check, name: str) -> str:
    """One call of ``check`` under torch.profiler (device busy time against wall time, top kernels and host
    ops), then one more under CUDA's sync debug mode (where it waits for the device)."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        began = time.perf_counter()
        check()
        torch.cuda.synchronize()
        wall_ms = 1e3 * (time.perf_counter() - began)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            check()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return kernel_report(profiler.key_averages(), wall_ms, 1, name) + "\n" + sync_report(records, name)


if __name__ == "__main__":
    main()
