"""Spike statistics without a Trainer: running moments, one step's shared values, the total gradient norm.

:class:`~ce_guard.callbacks.SeamHealthCallback` adapts Trainer hooks to these; the statistics and the
collectives live here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ce_guard import _dist


@dataclass
class RunningMoments:
    """An exponential moving mean and variance of one signal; non-finite values are never folded in."""

    mean: float = 0.0
    var: float = 0.0
    count: int = 0

    def zscore(self, value: float) -> float:
        if self.count == 0 or not math.isfinite(value):
            return math.inf if not math.isfinite(value) else 0.0
        return (value - self.mean) / math.sqrt(self.var + 1e-12)

    def update(self, value: float, decay: float) -> None:
        if not math.isfinite(value):
            return
        if self.count == 0:
            self.mean, self.var = value, 0.0
        else:
            delta = value - self.mean
            self.mean += (1 - decay) * delta
            self.var = decay * (self.var + (1 - decay) * delta * delta)
        self.count += 1


@dataclass
class StepValues:
    """One step's mean loss and gradient norm as every rank shares them, on their way to host memory.

    :meth:`share` reduces them in one all-reduce and starts a non-blocking copy to the host; :meth:`means`
    waits for the copy, by then long landed when read at the start of the next step.
    """

    step: int
    host: torch.Tensor  # (loss sum, norm sum, ranks with a loss, ranks with a norm)
    landed: Any         # a CUDA event, or None when the values are on the host already

    @classmethod
    def share(cls, step: int, loss_sum: torch.Tensor | None, micro_batches: int,
              grad_norm: torch.Tensor | None) -> "StepValues":
        """All-reduce this rank's mean loss (``loss_sum`` over ``micro_batches``) and the global ``grad_norm``;
        None where this rank has none."""
        device = grad_norm.device if grad_norm is not None else (
            loss_sum.device if loss_sum is not None else torch.device("cpu"))
        zero = torch.zeros((), dtype=torch.float64, device=device)
        loss = zero if loss_sum is None else loss_sum.to(device, torch.float64) / micro_batches
        norm = zero if grad_norm is None else grad_norm.to(device, torch.float64)
        # The mean loss over ranks that have one; the norm is already global, so the sum over ranks divided by
        # their count is the norm again.
        values = torch.stack([loss, norm, zero + (loss_sum is not None), zero + (grad_norm is not None)])
        _dist.all_reduce(values, dist.ReduceOp.SUM, dist.group.WORLD)
        if values.device.type != "cuda":
            return cls(step, values, None)
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record()
        return cls(step, host, landed)

    def means(self) -> dict[str, float]:
        """``{"loss": ..., "grad_norm": ...}`` over the ranks that had each; a signal no rank had is absent."""
        if self.landed is not None:
            self.landed.synchronize()  # long done by the next step's start: the optimizer step ran after it
        loss, grad_norm, with_loss, with_norm = self.host.tolist()
        return {name: total / count for name, total, count in (("loss", loss, with_loss),
                                                               ("grad_norm", grad_norm, with_norm)) if count}


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together: a sharded DTensor's over its whole mesh, a plain tensor as held here.

    Every step, so it stays cheap: squares are summed over local shards, grouped by (mesh, placements), with
    one all-reduce per sharded mesh dim and group, instead of a DTensor op and a collective per parameter
    (which cost a third of the throughput at TP=2 x DP=2, docs/benchmarks.md). A ``Partial`` gradient (not yet
    reduced) has no local norm to sum, so it is reduced on its own.
    """
    total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    local_groups: dict[Any, list[torch.Tensor]] = {}  # (mesh, placements), or None for plain tensors
    for grad in grads:
        grad = grad.detach()
        placements = getattr(grad, "placements", None)
        if placements is None:
            local_groups.setdefault(None, []).append(grad)
        elif any(p.is_partial() for p in placements):
            total += torch.linalg.vector_norm(grad.float()).full_tensor().square()
        else:
            local_groups.setdefault((grad.device_mesh, tuple(placements)), []).append(grad.to_local())
    for key, local in local_groups.items():
        squares = torch.nn.utils.get_total_norm(local, 2.0).float().square()
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if placement.is_shard():
                    dist.all_reduce(squares, group=mesh.get_group(dim))
        total += squares.to(total.device)
    return total.sqrt()
