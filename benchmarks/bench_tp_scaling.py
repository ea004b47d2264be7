"""Vocab-parallel output layer at TP = world size: forward + backward time and peak memory per rank.

Run once per TP degree; each rank holds a V/TP slice of the weight and all N tokens (layout [S,B,V/TP]):

    torchrun --nproc_per_node=1 benchmarks/bench_tp_scaling.py --out tp1.json
    torchrun --nproc_per_node=2 benchmarks/bench_tp_scaling.py --out tp2.json
    torchrun --nproc_per_node=4 benchmarks/bench_tp_scaling.py --out tp4.json

Rank zero writes the median over ranks' medians (time) and the max over ranks (memory). After timing, the
layer runs once more on the first ``--check-tokens`` tokens under ``check_seam`` (the guard's own verdict,
reference and budget computed over the same TP group), so each timing comes with its parity.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

from ce_guard.contract import CEContract
from ce_guard.fused import FusedLinearCrossEntropy

from calibrate_guard import run_check  # a sibling script: forward + backward, then check_seam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--check-tokens", type=int, default=2048)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    tp, rank = dist.get_world_size(), dist.get_rank()
    if args.vocab % tp:
        raise ValueError(f"--vocab {args.vocab} is not divisible by TP={tp}.")
    rows = args.vocab // tp
    contract = CEContract(vocab_size=args.vocab, layout="[S,B,V/TP]" if tp > 1 else "[N,V]",
                          vocab_start=rank * rows, vocab_end=(rank + 1) * rows, tp_group=dist.group.WORLD)

    g = torch.Generator().manual_seed(0)  # identical tokens on every rank; each keeps its own weight slice
    hidden = torch.randn(args.tokens, args.hidden, generator=g).cuda().bfloat16()
    full_weight = torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5
    weight = torch.nn.Parameter(full_weight[rank * rows:(rank + 1) * rows].cuda().bfloat16())
    del full_weight
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).cuda()
    targets[::17] = -100
    layer = FusedLinearCrossEntropy(args.hidden, contract, weight=weight)

    def step():
        h = hidden.detach().requires_grad_()
        loss = layer(h, targets)
        loss.backward()
        weight.grad = None
        return loss

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak_gb = (torch.cuda.max_memory_allocated() - base) / 2**30
    verdict = _guard_verdict(layer, hidden[:args.check_tokens], targets[:args.check_tokens])
    mine = torch.tensor([statistics.median(times), peak_gb], device="cuda")
    gathered = [torch.empty_like(mine) for _ in range(tp)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        ms = statistics.median(float(t[0]) for t in gathered)
        result = {"tp": tp, "tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "median_ms": ms,
                  "peak_extra_gb_per_rank": max(float(t[1]) for t in gathered), "guard": verdict,
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result))
    dist.destroy_process_group()


def _guard_verdict(layer: FusedLinearCrossEntropy, hidden: torch.Tensor, targets: torch.Tensor) -> dict:
    """The guard's check of one forward + backward of ``layer`` (every rank takes part; rank 0 reports)."""
    result, _ = run_check(layer, hidden, targets)
    report = result.report
    return {"cause": result.diagnosis.cause.value, "tokens": len(targets), "loss_rel_err": report.loss_rel_err,
            "grad_hidden_rel_err": report.grad_hidden_rel_err, "grad_weight_rel_err": report.grad_weight_rel_err,
            "budget_grad_hidden": report.budget.grad_hidden_rel, "budget_grad_weight": report.budget.grad_weight_rel}


if __name__ == "__main__":
    main()
