"""What moves the loss budget on real hidden states: the native path's error over each batch, biased or not.

    python benchmarks/budget_bias.py --batches 20 --out runs/budget_bias.json     # CPU, about 9 minutes

Per batch of the example model (``calibrate_guard.ExampleInputs``: d_model 64, 128 x 8 tokens, 100 steps) and
dtype: the budget ``native_error_budget`` earns on 256 sampled tokens and on every visible token, and PyTorch's
own path's per-token loss error against float64 over the whole batch (its mean, spread and the mean in standard
errors). Then peaked random rows show where an fp32 bias comes from: ``F.cross_entropy`` against float64, and
the same exponentials summed in float64.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from calibrate_guard import ExampleInputs, init_world

from ce_guard import CEContract, native_error_budget


def batch_row(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> dict:
    contract = CEContract(ignore_index=-100, vocab_size=weight.shape[0])
    budgets = {n: native_error_budget(hidden, weight, targets, contract, sample_tokens=n) for n in (256, targets.numel())}
    keep = targets != -100
    with torch.no_grad():
        exact = F.cross_entropy(F.linear(hidden[keep].double(), weight.double()), targets[keep], reduction="none")
        error = F.cross_entropy(F.linear(hidden[keep], weight).float(), targets[keep], reduction="none").double() - exact
    n = int(keep.sum())
    return {"dtype": str(hidden.dtype), "loss": float(exact.mean()), "tokens": n,
            "error_mean": float(error.mean()), "error_sd": float(error.std()),
            "error_mean_in_se": float(error.mean() / (error.std() / math.sqrt(n))),
            "native_rel_err": abs(float(error.mean())) / float(exact.mean()),
            "budget_256": budgets[256].loss_rel, "budget_all": budgets[targets.numel()].loss_rel}


def peaked_rows(n: int = 512, vocab: int = 100352) -> dict:
    """From uncertain to confident rows: fp32 cross-entropy's error, and with the exponentials summed exactly."""
    torch.manual_seed(0)
    logits = torch.randn(n, vocab) * 2
    targets = torch.randint(0, vocab, (n,))
    logits[torch.arange(n), targets] += torch.linspace(5, 25, n)
    target_logit = logits.double().gather(1, targets[:, None]).squeeze(1)
    exact = torch.logsumexp(logits.double(), 1) - target_logit
    top = logits.max(1, keepdim=True).values
    fp64_sum = top.squeeze(1).double() + torch.exp(logits - top).double().sum(1).log() - target_logit
    fp32 = F.cross_entropy(logits, targets, reduction="none").double()
    rows = {}
    for name, loss in (("cross_entropy_fp32", fp32), ("fp32_exps_fp64_sum", fp64_sum)):
        error = loss - exact
        rows[name] = {"mean": float(error.mean()), "mean_in_se": float(error.mean() / (error.std() / math.sqrt(n)))}
    confident = exact < 0.1
    rows["cross_entropy_fp32_rel_err_on_confident_rows"] = float(((fp32 - exact) / exact)[confident].mean())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100, help="training steps of the example model first")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    example = ExampleInputs(args.steps, 64, 128, 8, init_world("cpu"))
    rows = []
    for _ in range(args.batches):
        for dtype in (torch.bfloat16, torch.float32):
            rows.append(batch_row(*example.draw(dtype)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"batches": rows, "peaked_rows": peaked_rows()}
    for dtype in ("torch.bfloat16", "torch.float32"):
        mine = [r for r in rows if r["dtype"] == dtype]
        result[dtype] = {key: max(r[key] for r in mine) / min(r[key] for r in mine) for key in ("budget_256", "budget_all")}
        result[dtype]["native_over_budget_256_max"] = max(r["native_rel_err"] / r["budget_256"] for r in mine)
        result[dtype]["native_over_budget_all_max"] = max(r["native_rel_err"] / r["budget_all"] for r in mine)
    print(json.dumps({k: v for k, v in result.items() if k != "batches"}, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
