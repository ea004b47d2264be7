"""What every rank agrees on after a check, in collectives whose number and size do not grow with the world.

A check ends in two all-reduces and one broadcast over the world: the metrics' sums in one vector (with how
many ranks drift), their maxima in another (with the first drifting rank folded in), and the details of one
verdict, broadcast from that rank. Gathering every rank's verdict as Python objects instead delivers
world-size objects to every rank: 4,096 pickled dicts per check at TP = 8 x DP = 512. For the same reason the
metrics are not torchmetrics states: its default sync all-gathers each state from every rank, which grows
with the world (:class:`ce_guard.loss_parity.LossParity` uses it for three sums per validation loop).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ce_guard import _dist


@dataclass(frozen=True)
class Agreement:
    """One check as every rank sees it.

    ``verdict`` is the first drifting rank's (``rank``, ``cause``, ``variant``, ``drift``, ``summary``), else
    rank zero's; ``metrics`` holds the mean over ranks of each ``means`` entry and the largest of each
    ``maxima`` entry, NaN where some rank's value is NaN, absent where no rank had one.
    """

    verdict: dict[str, Any]
    ranks: int
    drifting_ranks: int
    metrics: dict[str, float]

    def history_entry(self, step: int) -> dict[str, Any]:
        """What a callback's ``history`` keeps of this check: alike on every rank, JSON-ready."""
        v = self.verdict
        return {"step": step, "drift": self.drifting_ranks > 0, "cause": v["cause"], "variant": v["variant"],
                "summary": v["summary"], "rank": v["rank"]}


def agree(verdict: Mapping[str, Any], means: Mapping[str, float | None], maxima: Mapping[str, float | None],
          device: torch.device) -> Agreement:
    """Reduce this rank's check over the world. Every rank must call it, with the same metric names.

    Args:
        verdict: this rank's ``rank``, ``cause``, ``variant``, ``drift`` (bool) and ``summary``.
        means: values averaged over ranks; None where this rank has none (it then counts as NaN).
        maxima: values whose worst rank is wanted (margins, max abs differences); None where this rank has none.
    """
    world, rank = _dist.group_size(dist.group.WORLD), _dist.group_rank(dist.group.WORLD)
    drift = bool(verdict["drift"])
    sums = torch.tensor([float(drift), *(math.nan if v is None else v for v in means.values())],
                        dtype=torch.float64, device=device)
    # MAX: -inf where absent, +inf for NaN (a non-finite margin is the worst); the first drifting rank as
    # world - rank, the largest for the lowest rank.
    peaks = torch.tensor([float(world - rank) if drift else 0.0,
                          *(-math.inf if v is None else (math.inf if math.isnan(v) else v) for v in maxima.values())],
                         dtype=torch.float64, device=device)
    _dist.all_reduce(sums, dist.ReduceOp.SUM, dist.group.WORLD)
    _dist.all_reduce(peaks, dist.ReduceOp.MAX, dist.group.WORLD)
    sums, peaks = sums.tolist(), peaks.tolist()
    drifting, first = int(sums[0]), (world - int(peaks[0]) if peaks[0] > 0 else 0)
    metrics = {name: total / world for name, total in zip(means, sums[1:])
               if not (means[name] is None and math.isnan(total))}
    metrics.update({name: peak for name, peak in zip(maxima, peaks[1:]) if peak != -math.inf})
    shared = [dict(verdict)]
    if world > 1:
        dist.broadcast_object_list(shared, src=first)
    return Agreement(verdict=shared[0], ranks=world, drifting_ranks=drifting, metrics=metrics)
