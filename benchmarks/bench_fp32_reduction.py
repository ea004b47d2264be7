"""fp32 gradient products on CUDA, one long reduction against blocks of ``FP32_REDUCTION_BLOCK``, side by side.

    python benchmarks/bench_fp32_reduction.py --out runs/fp32_reduction.json     # one GPU, about 6 minutes

On the example model's hidden states (``calibrate_guard.ExampleInputs``: d_model 256, 256 x 8 tokens, 300
steps, V = 100352), fp32, per batch: dL/dh and dL/dW of the fused layer and of the reference against float64
autograd, each summed in blocks (``ce_guard._matmul``) and in one product; then ``check_seam`` margins over
``--checks`` batches for the fused layer both ways, and the fused layer's step time both ways on random inputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from calibrate_guard import ExampleInputs, init_world, run_check

from ce_guard import CEContract, _matmul, diagnosis
from ce_guard.fused import FusedLinearCrossEntropy, fused_linear_cross_entropy
from ce_guard.reference import reference_linear_cross_entropy

BLOCKED = _matmul.FP32_REDUCTION_BLOCK
WAYS = {"blocks": BLOCKED, "one product": 1 << 62}


def use(way: str) -> None:
    _matmul.FP32_REDUCTION_BLOCK = WAYS[way]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def errors(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> dict:
    """dL/dh and dL/dW relative errors against float64 autograd, both paths, both ways."""
    hidden, weight = hidden.detach(), weight.detach()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    F.cross_entropy(F.linear(h64, w64), targets).backward()
    contract = CEContract(vocab_size=weight.shape[0])
    row = {}
    for way in WAYS:
        use(way)
        ref = reference_linear_cross_entropy(hidden, weight, targets, contract)
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fused_linear_cross_entropy(h, w, targets, contract=contract).backward()
        row[way] = {"reference": [rel(ref.grad_hidden, h64.grad), rel(ref.grad_weight, w64.grad)],
                    "fused": [rel(h.grad, h64.grad), rel(w.grad, w64.grad)]}
    use("blocks")
    return row


def margins(example: ExampleInputs, checks: int) -> dict:
    """The fused layer's dL/dh margin and verdict per check, both ways on the same batches."""
    seen = {way: {"margins": [], "drift": 0} for way in WAYS}
    for _ in range(checks):
        hidden, weight, targets = example.draw(torch.float32)
        for way in WAYS:
            use(way)
            layer = FusedLinearCrossEntropy(hidden.shape[1], CEContract(vocab_size=weight.shape[0]), weight=weight)
            result, _ = run_check(layer, hidden, targets)
            seen[way]["margins"].append(diagnosis.margins(result.report)["grad_hidden"])
            seen[way]["drift"] += int(result.diagnosis.drift)
    use("blocks")
    return {way: {"checks": checks, "drift": s["drift"], "grad_hidden_margin_median": statistics.median(s["margins"]),
                  "grad_hidden_margin_max": max(s["margins"])} for way, s in seen.items()}


def step_ms(shape: tuple[int, int, int], dtype: torch.dtype, rounds: int = 3, steps: int = 6) -> dict:
    """Median fused forward + backward, the two ways alternated so clock drift hits both."""
    n, d, v = shape
    torch.manual_seed(0)
    hidden = torch.randn(n, d, device="cuda", dtype=dtype)
    weight = (torch.randn(v, d, device="cuda") / d ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda")
    contract = CEContract(vocab_size=v)
    times = {way: [] for way in WAYS}
    for _ in range(rounds):
        for way in WAYS:
            use(way)
            for i in range(steps + 2):
                h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fused_linear_cross_entropy(h, w, targets, contract=contract).backward()
                end.record()
                torch.cuda.synchronize()
                if i >= 2:
                    times[way].append(start.elapsed_time(end))
    use("blocks")
    return {way: statistics.median(t) for way, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--example-steps", type=int, default=300)
    parser.add_argument("--batches", type=int, default=8, help="batches for the errors against float64")
    parser.add_argument("--checks", type=int, default=60)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_float32_matmul_precision("highest")
    started = time.time()
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "block": BLOCKED}
    if args.device == "cuda":
        result["step_ms"] = {f"{n}x{d}x{v} {dtype}": step_ms((n, d, v), dtype) for n, d, v, dtype in (
            (8192, 4096, 151936, torch.float32), (2048, 256, 100352, torch.float32))}
        print(json.dumps(result["step_ms"]), flush=True)
    example = ExampleInputs(args.example_steps, 256, 256, 8, init_world(args.device))
    result["errors"] = [errors(*example.draw(torch.float32)) for _ in range(args.batches)]
    for row in result["errors"]:
        print(json.dumps(row), flush=True)
    result["margins"] = margins(example, args.checks)
    result["seconds"] = time.time() - started
    print(json.dumps(result["margins"], indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
