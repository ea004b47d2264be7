"""One chunk of the fused layer's plain-torch math: logits, softmax, loss and dLoss/dz, with their vocab collectives.

What it computes is derived from the ``CEContract`` alone (:class:`ChunkMath`). The handful of decisions
the math takes on the way (which rank owns a target, what a mean counts, the softmax denominator over the
global vocabulary, label smoothing's uniform term, a scale on the loss, whether the CUDA kernels may run)
are made by a :class:`ChunkRules` object, so that ``ce_guard.testing`` can break one of them while the layer
keeps declaring its contract, and this module holds none of those faults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from ce_guard._dist import all_reduce, group_size
from ce_guard._matmul import matmul
from ce_guard.contract import CEContract

__all__ = ["ChunkMath", "ChunkRules", "TargetRows"]


class TargetRows(NamedTuple):
    """Where each token's target lives in this rank's weight slice."""

    row: torch.Tensor  # (n,) int64 row in [0, V/TP); 0 where not owned
    owned: torch.Tensor  # (n,) bool: this rank holds the target's logit


class ChunkRules:
    """The decisions inside the chunk math, each taken as the contract says.

    The Triton kernels (``ce_guard.fused_kernel``) compute exactly these decisions, so rules that change
    any of them set ``kernel_allowed = False`` and run on the plain-torch math below.
    """

    kernel_allowed: bool = True  # whether the CUDA kernel path may compute a chunk under these rules
    loss_scale: float = 1  # loss and gradients are multiplied by this

    def locate_targets(self, targets: torch.Tensor, m: ChunkMath) -> TargetRows:
        """Mask targets outside ``[vocab_start, vocab_end)`` *before* the gather, so no rank reads a wrong row."""
        local = targets - m.vocab_start
        owned = (targets != m.ignore_index) & (local >= 0) & (local < m.vocab_slice_size)
        return TargetRows(torch.where(owned, local, 0), owned)

    def counted(self, targets: torch.Tensor, m: ChunkMath) -> torch.Tensor:
        """The tokens (n,) bool a ``mean`` divides by: the visible ones."""
        return targets != m.ignore_index

    def denominator(self, summed: torch.Tensor, m: ChunkMath) -> torch.Tensor:
        """``sum_v exp(z_v - max)`` over the global vocabulary, from its sum over the TP group's slices (n,)."""
        return summed

    def smoothing_vocab(self, m: ChunkMath) -> int:
        """The V of label smoothing's uniform term ``eps / V``: the global vocabulary."""
        return m.vocab_size

    def mean_logit(self, slice_sum: torch.Tensor, global_sum: torch.Tensor, m: ChunkMath) -> torch.Tensor:
        """Label smoothing's ``mean_v z_v`` (n,), from this slice's ``sum_v z_v`` or the TP group's."""
        return global_sum / m.vocab_size


HONEST = ChunkRules()


@dataclass(frozen=True, kw_only=True)
class ChunkMath:
    """What the chunk loop computes: the contract's promises, and the rules that take the math's decisions."""

    vocab_size: int
    vocab_start: int
    vocab_end: int
    reduction: str
    ignore_index: int
    label_smoothing: float
    z_loss: float
    logit_multiplier: float
    softcap: float | None
    accum_dtype: torch.dtype
    sequence_parallel: bool
    tp_group: ProcessGroup | None  # None for layout [N,V]: no vocab collectives at all
    count_group: ProcessGroup | None  # group a mean's token count is summed over; None = this rank's view
    count_share: int  # the summed count is divided by this (token group size under grad averaging)
    rules: ChunkRules = HONEST

    @classmethod
    def of(cls, contract: CEContract, rules: ChunkRules = HONEST) -> ChunkMath:
        """The chunk math of ``contract``.

        Raises:
            ValueError: for the promises this layer does not implement: a mean over a count given with each step
                (its forward takes no count), a z-loss over all positions, and an L2-warp penalty.
        """
        if contract.normalize_by == "given_count":
            raise ValueError("ce_guard's fused layer counts a mean's tokens itself; its forward takes no count, so it"
                             " cannot keep normalize_by='given_count'. Declare 'local_tokens' or 'global_tokens', or"
                             " guard a layer that divides by the given count (transformers' num_items_in_batch).")
        if contract.z_loss_positions == "all" and contract.z_loss:
            raise ValueError("ce_guard's fused layer adds its z-loss per counted token only; it does not implement"
                             " z_loss_positions='all'. Declare z_loss_positions='counted'.")
        if contract.l2_warp:
            raise ValueError("ce_guard's fused layer has no L2-warp penalty, so it would train without the contract's"
                             f" l2_warp={contract.l2_warp:g}. Declare l2_warp=0, or use flash-linear-attention's"
                             " path under guard (ce_guard.fla_adapter).")
        global_mean = contract.reduction == "mean" and contract.normalize_by == "global_tokens"
        averaged = global_mean and contract.grad_sync == "average"
        return cls(
            vocab_size=contract.vocab_size,
            vocab_start=contract.vocab_start,
            vocab_end=contract.vocab_end,
            reduction=contract.reduction,
            ignore_index=contract.ignore_index,
            label_smoothing=contract.label_smoothing,
            z_loss=contract.z_loss,
            logit_multiplier=contract.logit_multiplier,
            softcap=contract.softcap,
            accum_dtype=contract.accum_dtype,
            sequence_parallel=contract.sequence_parallel,
            tp_group=None if contract.layout == "[N,V]" else contract.tp_group,
            count_group=contract.token_group if global_mean else None,
            count_share=group_size(contract.token_group) if averaged else 1,
            rules=rules,
        )

    @property
    def vocab_slice_size(self) -> int:
        return self.vocab_end - self.vocab_start

    @property
    def loss_dtype(self) -> torch.dtype:
        """Losses are summed in fp32 at least, whatever the accumulators' dtype."""
        return torch.promote_types(self.accum_dtype, torch.float32)


def project(hidden: torch.Tensor, weight: torch.Tensor, m: ChunkMath) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of one chunk in the accumulator dtype, times the logit multiplier, softcapped; also tanh(z/c) for the
    softcap's chain rule.

    The matmul runs in the input dtype (bf16 tensor cores for bf16; on CPU ``ce_guard._matmul.matmul``'s fp32
    products rounded once); the multiplier and the softmax math after the cast run in ``accum_dtype``.
    """
    logits = matmul(hidden, weight.T).to(m.accum_dtype)  # (n, V/TP)
    if m.logit_multiplier != 1:
        logits = logits.mul_(m.logit_multiplier)  # in place: the matmul's own output, no input's
    if m.softcap is None:
        return logits, None
    tanh = torch.tanh(logits / m.softcap)
    return tanh * m.softcap, tanh


class ChunkLoss(NamedTuple):
    lse: torch.Tensor  # (n,) log-sum-exp over the global vocab (as the rules compute it)
    loss: torch.Tensor  # (n,) per-token loss, 0 on ignored tokens
    probs: torch.Tensor  # (n, V/TP) softmax over the global vocab, this rank's columns


def chunk_loss(logits: torch.Tensor, targets: torch.Tensor, rows: TargetRows, m: ChunkMath) -> ChunkLoss:
    """Per-token loss ``(1-eps)(lse - z_y) + eps(lse - mean_v z) + z_loss lse^2`` with its vocab collectives.

    Consumes ``logits`` (overwritten by the probabilities) to keep one ``(n, V/TP)`` buffer alive.
    """
    row_max = all_reduce(logits.amax(dim=1), dist.ReduceOp.MAX, m.tp_group)  # (n,) over TP
    target_logit = torch.where(rows.owned, logits.gather(1, rows.row[:, None]).squeeze(1), 0)  # (n,)
    logit_sum = logits.sum(dim=1) if m.label_smoothing else torch.zeros_like(row_max)  # (n,) this slice's sum_v z_v
    probs = logits.sub_(row_max[:, None]).exp_()  # (n, V/TP) exp(z - max), in place
    sums = torch.stack([probs.sum(dim=1), target_logit, logit_sum])  # (3, n): denominator, z_y, sum_v z_v
    denominator, target_logit, global_logit_sum = all_reduce(sums, dist.ReduceOp.SUM, m.tp_group).unbind(0)
    denominator = m.rules.denominator(denominator, m)
    lse = row_max + denominator.log()  # (n,)
    loss = token_loss(lse, target_logit, m.rules.mean_logit(logit_sum, global_logit_sum, m), targets, m)
    return ChunkLoss(lse, loss, probs.div_(denominator[:, None]))


def token_loss(lse: torch.Tensor, target_logit: torch.Tensor, mean_logit: torch.Tensor, targets: torch.Tensor,
               m: ChunkMath) -> torch.Tensor:
    """``(1-eps)(lse - z_y) + eps(lse - mean_v z) + z_loss lse^2`` per token (n,), 0 on ignored tokens."""
    eps = m.label_smoothing
    loss = lse - (1 - eps) * target_logit - eps * mean_logit
    if m.z_loss:
        loss = loss + m.z_loss * lse.square()
    return torch.where(targets != m.ignore_index, loss, 0)


def logit_grad(probs: torch.Tensor, tanh: torch.Tensor | None, lse: torch.Tensor, rows: TargetRows,
               row_weight: torch.Tensor, m: ChunkMath) -> torch.Tensor:
    """dLoss/dz for one chunk, in place over ``probs``; ``row_weight`` (n,) is 0 on ignored tokens.

    d/dz_v of the per-token loss is ``p_v (1 + 2 z_loss lse) - (1-eps) [v = y] - eps / V``; times the softcap's
    derivative and the logit multiplier, it is the gradient of the matmul's output.
    """
    eps = m.label_smoothing
    grad = probs.mul_((row_weight * (1 + 2 * m.z_loss * lse))[:, None])  # (n, V/TP)
    grad.scatter_add_(1, rows.row[:, None], (-(1 - eps) * row_weight * rows.owned)[:, None].to(grad.dtype))
    if eps:
        grad.sub_((eps / m.rules.smoothing_vocab(m) * row_weight)[:, None])
    if tanh is not None:
        grad.mul_(1 - tanh.square())  # d(c tanh(z/c))/dz
    if m.logit_multiplier != 1:
        grad.mul_(m.logit_multiplier)  # d(m raw)/draw
    return grad


def mean_divisor(targets: torch.Tensor, m: ChunkMath) -> torch.Tensor:
    """The count a ``mean`` divides by; 1 when no token is visible, so the loss and grads are 0, not NaN."""
    count = all_reduce(m.rules.counted(targets, m).sum(), dist.ReduceOp.SUM, m.count_group)  # int64: exact
    divisor = count.to(torch.float64) / m.count_share
    return torch.where(count > 0, divisor, 1.0)


def torch_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                m: ChunkMath, want_grads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's per-token losses (n,) and dLoss/dz (n, V/TP) for visible tokens weighted by ``row_scale``."""
    logits, tanh = project(hidden, weight, m)  # (n, V/TP)
    rows = m.rules.locate_targets(targets, m)
    chunk = chunk_loss(logits, targets, rows, m)
    if not want_grads:
        return chunk.loss, None
    row_weight = torch.where(targets != m.ignore_index, row_scale, 0)  # (n,)
    return chunk.loss, logit_grad(chunk.probs, tanh, chunk.lse, rows, row_weight, m)
