"""Peers' fused output layers under the guard: each adapter's forward + backward, then ``check_seam``.

    python benchmarks/peer_parity.py --tokens 8192 --hidden 2048 --vocab 32768

Prints one line per path: the cause the guard names and its numbers. Peers that are not installed
are listed as skipped. Megatron-core's paths run at TP = 1 in a process group of one (started here when
none is).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from ce_guard import CEContract, SeamOutputs, SeamRecord, check_seam
from ce_guard.adapters import (CutCrossEntropy, LigerFusedLinearCrossEntropy, MegatronOutputLayer,
                               TorchLinearCrossEntropy)
from ce_guard.fused import FusedLinearCrossEntropy


def paths(d: int, v: int) -> dict:
    return {
        "ce_guard fused": lambda w: FusedLinearCrossEntropy(d, CEContract(vocab_size=v), weight=w),
        "Liger (default: bf16 dW)": lambda w: LigerFusedLinearCrossEntropy(d, v, weight=w),
        "Liger (accum_dtype=fp32)": lambda w: LigerFusedLinearCrossEntropy(d, v, weight=w, accum_dtype=torch.float32),
        "Cut CE (default filter)": lambda w: CutCrossEntropy(d, v, weight=w),
        "Cut CE (filter_eps=None)": lambda w: CutCrossEntropy(d, v, weight=w, filter_eps=None),
        "F.linear_cross_entropy": lambda w: TorchLinearCrossEntropy(d, v, weight=w),
        "Megatron vocab_parallel_cross_entropy": lambda w: MegatronOutputLayer(d, v, weight=w),
        "Megatron fused 'native' CE": lambda w: MegatronOutputLayer(d, v, weight=w, cross_entropy_fusion=True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--paths", nargs="*", help="run only paths whose name starts with one of these")
    args = parser.parse_args()
    if not dist.is_initialized():  # Megatron's losses all-reduce over a TP group, here of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl", rank=0, world_size=1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, generator=g).cuda().bfloat16()
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).cuda().bfloat16()
    targets = torch.randint(0, args.vocab, (args.tokens,), generator=g).cuda()
    targets[::17] = -100
    for name, build in paths(args.hidden, args.vocab).items():
        if args.paths and not any(name.startswith(prefix) for prefix in args.paths):
            continue
        torch.cuda.empty_cache()
        w = torch.nn.Parameter(weight.clone())
        try:
            layer = build(w)
            h = hidden.detach().requires_grad_()
            loss = layer(h, targets)
            loss.backward()
        except (ImportError, TypeError, ValueError, RuntimeError) as error:
            print(json.dumps({"path": name, "status": f"skipped: {type(error).__name__}: {error}"[:300]}))
            continue
        fused = SeamOutputs(loss=loss.detach().float(), grad_hidden=h.grad, grad_weight=w.grad)
        result = check_seam(SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0),
                            layer.ce_contract)
        r = result.report
        print(json.dumps({"path": name, "cause": result.diagnosis.cause.value, "loss_rel_err": r.loss_rel_err,
                          "dh_rel_err": r.grad_hidden_rel_err, "dw_rel_err": r.grad_weight_rel_err,
                          "budget_dh": r.budget.grad_hidden_rel, "budget_dw": r.budget.grad_weight_rel,
                          "dh_norm_ratio": r.grad_hidden_norm_ratio,
                          "dh_coupling": r.grad_hidden_magnitude_coupling,
                          "summary": result.diagnosis.summary[:240]}))
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "shape": [args.tokens, args.hidden, args.vocab]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
