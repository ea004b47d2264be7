"""16-bit products on CPU: PyTorch's bf16 GEMM against ``ce_guard._matmul.matmul`` (fp32 products, rounded once).

    python benchmarks/bench_cpu_half_products.py --out runs/cpu_half_products.json     # CPU, about 30 minutes

At tests/test_signature.py's shape (N, D, V = 2048, 128, 32768, bf16): the three products' times and how many
elements differ; the signature fit with its native yardstick on each way, handed PyTorch's own native gradients
(loss times 1 and 1.002, always on the real GEMM); the budget's native path each way; and ``check_seam`` on the
test file's fused paths (tests/broken_paths.py, the faulty layer) with every 16-bit product each way.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ce_guard import (
    CEContract,
    SeamOutputs,
    SeamRecord,
    _matmul,
    budget,
    check_seam,
    fused,
    fused_chunk,
    signature,
)
from ce_guard.diagnosis import margins
from ce_guard.reference import reference_linear_cross_entropy
from ce_guard.signature import fit_signatures
from ce_guard.testing import FaultyFusedLinearCrossEntropy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import broken_paths  # the tests' independent fused path

N, D, V = 2048, 128, 32768
USERS = (signature, budget, fused, fused_chunk, broken_paths)  # the modules that call _matmul.matmul


def gemm(a: torch.Tensor, b: torch.Tensor, *, add: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch's own GEMM in the operands' dtype."""
    return a @ b if add is None else torch.addmm(add, a, b)


WAYS = {"bf16 GEMM": gemm, "matmul": _matmul.matmul}


def use(way: str) -> None:
    for module in USERS:
        module.matmul = WAYS[way]


def inputs(seed: int, *, spread: float = 2.0, pad: float = 0.05):
    """tests/test_signature.py's ``_inputs`` in bf16."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * (spread / D ** 0.5)
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.randperm(N, generator=gen)[:round(pad * N)]] = -100
    return hidden.bfloat16(), weight.bfloat16(), targets


def products() -> dict:
    hidden, weight, _ = inputs(0)
    dz = (torch.randn(N, V, generator=torch.Generator().manual_seed(1)) * 1e-4).bfloat16()
    row = {}
    for name, (a, b) in {"logits h @ W.T": (hidden, weight.T), "dL/dh dz @ W": (dz, weight),
                         "dL/dW dz.T @ h": (dz.T, hidden)}.items():
        out = {}
        for way, fn in WAYS.items():
            start = time.perf_counter()
            out[way] = fn(a, b)
            row[f"{name}, {way} s"] = round(time.perf_counter() - start, 3)
        row[f"{name}, elements differing"] = [int((out["bf16 GEMM"] != out["matmul"]).sum()), out["matmul"].numel()]
    return row


def fits(seed: int, spread: float) -> dict:
    hidden, weight, targets = inputs(seed, spread=spread)
    contract = CEContract(vocab_size=V)
    ref = reference_linear_cross_entropy(hidden, weight, targets, contract)
    row = {"seed": seed, "spread": spread}
    for factor in (1.0, 1.002):
        h = hidden.detach().requires_grad_()
        loss = F.cross_entropy(F.linear(h, weight).float(), targets) * factor  # PyTorch's own, the real GEMM
        loss.backward()
        for way in WAYS:
            use(way)
            fit = fit_signatures(hidden, weight, targets, h.grad, ref.grad_hidden, ref.token_weight, contract,
                                 loss_factor=float(loss.detach() / ref.loss) - 1 if factor != 1 else None)
            row[f"x{factor} {way}"] = {"softmax_spread": fit.softmax_spread, "spread_se": fit.softmax_spread_se,
                                       "pure_scale": fit.pure_scale, "scale_se": fit.scale_se}
    for way in WAYS:
        use(way)
        b = budget.native_error_budget(hidden, weight, targets, contract, sample_tokens=256)
        row[f"budget {way}"] = {"loss_rel": b.loss_rel, "grad_hidden_rel": b.grad_hidden_rel,
                                "grad_weight_rel": b.grad_weight_rel}
    use("matmul")
    return row


def checks(case: str) -> dict:
    """``scale:SEED``, ``clean:SEED``, ``accumulators:SEED:CHUNKS`` or ``within:SEED:CHUNKS`` (the test file's)."""
    kind, seed, *chunks = case.split(":")
    hidden, weight, targets = inputs(int(seed), pad=0.0 if kind == "within" else 0.05)
    contract = CEContract(vocab_size=V)
    row = {"case": case}
    for way in WAYS:
        use(way)
        start = time.perf_counter()
        if kind in ("scale", "clean"):
            fault = "grad_scale" if kind == "scale" else None
            out = broken_paths.broken_fused(hidden, weight, targets, contract, fault, scale=1.002)
        else:
            layer = FaultyFusedLinearCrossEntropy(D, contract, weight=torch.nn.Parameter(weight.clone()),
                                                  fault="bf16_accumulators", token_chunk=math.ceil(N / int(chunks[0])))
            h = hidden.detach().requires_grad_()
            loss = layer(h, targets)
            loss.backward()
            out = SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=layer.weight.grad)
        record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=out, upstream=1.0)
        result = check_seam(record, contract)
        fit = result.report.signature
        row[way] = {"cause": result.diagnosis.cause.value, "margins": margins(result.report), "scale": fit.scale,
                    "scale_sigmas": fit.sigmas("scale"), "softmax_spread": fit.softmax_spread,
                    "spread_sigmas": fit.spread_sigmas(), "pure_scale": fit.pure_scale,
                    "seconds": round(time.perf_counter() - start, 1)}
    use("matmul")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fits", nargs="*", default=["0:2", "1:2", "2:2", "3:2", "3:12", "0:12", "1:24"],
                        help="SEED:SPREAD")
    parser.add_argument("--checks", nargs="*", default=["scale:0", "scale:5", "clean:1", "accumulators:1:1",
                                                        "accumulators:2:256", "within:4:16"])
    args = parser.parse_args()
    torch.set_float32_matmul_precision("highest")
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "products": products(),
               "fits": [fits(int(s), float(p)) for s, p in (f.split(":") for f in args.fits)],
               "checks": [checks(c) for c in args.checks]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
