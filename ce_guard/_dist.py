"""Process-group plumbing that degrades to a world of one: no math lives here.

The reference and the fused path both need "size of this group" and "all-reduce if there is
anyone to reduce with". These helpers only answer those questions; every formula stays in the
module that owns it, so the two paths never share arithmetic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def group_size(group: ProcessGroup | None) -> int:
    """World size of ``group``; 1 when there is no group or no initialised process group."""
    if group is None or not is_distributed():
        return 1
    return dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    if group is None or not is_distributed():
        return 0
    return dist.get_rank(group)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType, group: ProcessGroup | None) -> torch.Tensor:
    """In-place all-reduce over ``group``; a no-op for a world of one."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def all_gather_dim0(tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Concatenate equally shaped ``tensor`` from every rank of ``group`` along dim 0 (rank order)."""
    world = group_size(group)
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)
