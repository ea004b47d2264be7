"""ce_guard's own fused linear + cross-entropy output layer: chunked over tokens, vocab-parallel aware.

The ``[N, V]`` logits are never held. For ``mean`` and ``sum`` each chunk of tokens is projected,
reduced to its loss and to its gradients during forward, then dropped (Liger's design); backward only
scales them by the upstream gradient. For ``none`` the upstream gradient differs per token and is
unknown at forward time, so forward keeps the per-token log-sum-exp and backward recomputes each chunk.

Everything here is derived from the ``CEContract`` alone and shares no code with
``ce_guard.reference``: the guard compares two independent derivations of the same promises.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from ce_guard._dist import all_gather_dim0, all_reduce, group_rank, group_size
from ce_guard.contract import CEContract
from ce_guard.faults import SeamFault

__all__ = ["FusedLinearCrossEntropy", "fused_linear_cross_entropy", "make_output_weight"]


@dataclass(frozen=True, kw_only=True)
class _ChunkMath:
    """What the chunk loop computes: the contract's promises, unless a fault edited one of them."""

    vocab_size: int
    vocab_start: int
    vocab_end: int
    reduction: str
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None
    accum_dtype: torch.dtype
    sequence_parallel: bool
    tp_group: ProcessGroup | None  # None for layout [N,V]: no vocab collectives at all
    count_group: ProcessGroup | None  # group a mean's token count is summed over; None = this rank's view
    count_share: int  # the summed count is divided by this (token group size under grad averaging)
    count_ignored: bool = False  # fault: ignored tokens counted in the divisor
    target_rule: str = "masked"  # "masked" (honest), "clamped" or "off_by_one" (faults)
    smoothing_local: bool = False  # fault: smoothing's mean over this rank's slice
    denominator_summed_twice: bool = False  # fault: second SUM over TP of the reduced denominator
    scale: int = 1  # fault: loss and grads times this

    @property
    def vocab_slice_size(self) -> int:
        return self.vocab_end - self.vocab_start


def _resolve_math(contract: CEContract, fault: SeamFault | None, fault_scale: int) -> _ChunkMath:
    global_mean = contract.reduction == "mean" and contract.normalize_by == "global_tokens"
    honest = _ChunkMath(
        vocab_size=contract.vocab_size,
        vocab_start=contract.vocab_start,
        vocab_end=contract.vocab_end,
        reduction=contract.reduction,
        ignore_index=contract.ignore_index,
        label_smoothing=contract.label_smoothing,
        z_loss=contract.z_loss,
        softcap=contract.softcap,
        accum_dtype=contract.accum_dtype,
        sequence_parallel=contract.sequence_parallel,
        tp_group=None if contract.layout == "[N,V]" else contract.tp_group,
        count_group=contract.token_group if global_mean else None,
        count_share=group_size(contract.token_group) if global_mean and contract.grad_sync == "average" else 1,
    )
    if fault is None:
        return honest
    edits = {
        SeamFault.LOCAL_NORMALIZATION: dict(count_group=None, count_share=1),
        SeamFault.GRAD_SCALE: dict(scale=fault_scale),
        SeamFault.BF16_ACCUMULATORS: dict(accum_dtype=torch.bfloat16),
        SeamFault.UNMASKED_PARTITION_TARGETS: dict(target_rule="clamped"),
        SeamFault.PARTITION_OFF_BY_ONE: dict(target_rule="off_by_one"),
        SeamFault.IGNORE_IN_DENOMINATOR: dict(count_ignored=True),
        SeamFault.SMOOTHING_LOCAL_VOCAB: dict(smoothing_local=True),
        SeamFault.GATHERED_LOGITS_LOG_TP: dict(denominator_summed_twice=True),
        SeamFault.MISSING_Z_LOSS: dict(z_loss=0.0),
    }[fault]
    return dataclasses.replace(honest, **edits)


class _TargetRows(NamedTuple):
    """Where each token's target lives in this rank's weight slice."""

    row: torch.Tensor  # (n,) int64 row in [0, V/TP); 0 where not owned
    owned: torch.Tensor  # (n,) bool: this rank holds the target's logit


def _locate_targets(targets: torch.Tensor, m: _ChunkMath) -> _TargetRows:
    """Mask targets outside ``[vocab_start, vocab_end)`` *before* the gather, so no rank reads a wrong row."""
    valid = targets != m.ignore_index
    local = targets - m.vocab_start
    last = m.vocab_slice_size - 1
    if m.target_rule == "masked":
        owned = valid & (local >= 0) & (local <= last)
        return _TargetRows(torch.where(owned, local, 0), owned)
    if m.target_rule == "clamped":  # fault: every rank claims every target, clamped into its slice
        return _TargetRows(local.clamp(0, last), valid)
    owned = valid & (local >= 0) & (local <= last + 1)  # fault "off_by_one": admits target == vocab_end
    return _TargetRows(torch.where(owned, local, 0).clamp(max=last), owned)


def _project(hidden: torch.Tensor, weight: torch.Tensor, m: _ChunkMath) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits of one chunk in the accumulator dtype, softcapped; also tanh(z/c) for the softcap's chain rule.

    The matmul runs in the input dtype (bf16 tensor cores for bf16); the softmax math after the cast
    runs in ``accum_dtype``.
    """
    logits = (hidden @ weight.T).to(m.accum_dtype)  # (n, V/TP)
    if m.softcap is None:
        return logits, None
    tanh = torch.tanh(logits / m.softcap)
    return tanh * m.softcap, tanh


class _ChunkLoss(NamedTuple):
    lse: torch.Tensor  # (n,) log-sum-exp over the global vocab (as the fault, if any, computes it)
    loss: torch.Tensor  # (n,) per-token loss, 0 on ignored tokens
    probs: torch.Tensor  # (n, V/TP) softmax over the global vocab, this rank's columns


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor, rows: _TargetRows, m: _ChunkMath) -> _ChunkLoss:
    """Per-token loss ``(1-eps)(lse - z_y) + eps(lse - mean_v z) + z_loss lse^2`` with its vocab collectives.

    Consumes ``logits`` (overwritten by the probabilities) to keep one ``(n, V/TP)`` buffer alive.
    """
    eps = m.label_smoothing
    row_max = all_reduce(logits.amax(dim=1), dist.ReduceOp.MAX, m.tp_group)  # (n,) over TP
    target_logit = torch.where(rows.owned, logits.gather(1, rows.row[:, None]).squeeze(1), 0)  # (n,)
    logit_sum = logits.sum(dim=1) if eps else torch.zeros_like(row_max)  # (n,) this slice's sum_v z_v
    probs = logits.sub_(row_max[:, None]).exp_()  # (n, V/TP) exp(z - max), in place
    sums = torch.stack([probs.sum(dim=1), target_logit, logit_sum])  # (3, n): denominator, z_y, sum_v z_v
    denominator, target_logit, global_logit_sum = all_reduce(sums, dist.ReduceOp.SUM, m.tp_group).unbind(0)
    if m.denominator_summed_twice:  # fault: the already reduced denominator summed over TP again
        denominator = all_reduce(denominator.clone(), dist.ReduceOp.SUM, m.tp_group)
    lse = row_max + denominator.log()  # (n,)
    if m.smoothing_local:  # fault: Megatron's local partition mean
        mean_logit = logit_sum / m.vocab_slice_size
    else:
        mean_logit = global_logit_sum / m.vocab_size
    loss = lse - (1 - eps) * target_logit - eps * mean_logit
    if m.z_loss:
        loss = loss + m.z_loss * lse.square()
    loss = torch.where(targets != m.ignore_index, loss, 0)
    return _ChunkLoss(lse, loss, probs.div_(denominator[:, None]))


def _logit_grad(probs: torch.Tensor, tanh: torch.Tensor | None, lse: torch.Tensor, rows: _TargetRows,
                row_weight: torch.Tensor, m: _ChunkMath) -> torch.Tensor:
    """dLoss/dz for one chunk, in place over ``probs``; ``row_weight`` (n,) is 0 on ignored tokens.

    d/dz_v of the per-token loss is ``p_v (1 + 2 z_loss lse) - (1-eps) [v = y] - eps / V``.
    """
    eps = m.label_smoothing
    grad = probs.mul_((row_weight * (1 + 2 * m.z_loss * lse))[:, None])  # (n, V/TP)
    grad.scatter_add_(1, rows.row[:, None], (-(1 - eps) * row_weight * rows.owned)[:, None].to(grad.dtype))
    if eps:
        smoothing_vocab = m.vocab_slice_size if m.smoothing_local else m.vocab_size
        grad.sub_((eps / smoothing_vocab * row_weight)[:, None])
    if tanh is not None:
        grad.mul_(1 - tanh.square())  # d(c tanh(z/c))/dz
    return grad


def _mean_divisor(targets: torch.Tensor, m: _ChunkMath) -> torch.Tensor:
    """The count a ``mean`` divides by; 1 when no token is visible, so the loss and grads are 0, not NaN."""
    counted = torch.ones_like(targets, dtype=torch.bool) if m.count_ignored else targets != m.ignore_index
    count = all_reduce(counted.sum(), dist.ReduceOp.SUM, m.count_group)  # int64: exact at any size
    divisor = count.to(torch.float64) / m.count_share
    return torch.where(count > 0, divisor, 1.0)


def _loss_dtype(m: _ChunkMath) -> torch.dtype:
    return torch.promote_types(m.accum_dtype, torch.float32)


def _chunks(n_tokens: int, token_chunk: int) -> range:
    return range(0, n_tokens, token_chunk)


class _FusedLinearCrossEntropyFn(torch.autograd.Function):
    """Autograd boundary: inputs as the caller holds them, gradients as the caller expects them.

    The hidden gradient is the full one (summed over the TP group's vocab slices); under the SP layout
    it is that sum restricted to this rank's rows of the gathered sequence.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, m: _ChunkMath,
                token_chunk: int | None, grad_enabled: bool) -> torch.Tensor:
        ctx.math = m
        ctx.local_hidden_shape = hidden.shape
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        if m.sequence_parallel:
            hidden = all_gather_dim0(hidden, m.tp_group)  # (S, B, D) from (S/SP, B, D), rank order
            targets = all_gather_dim0(targets, m.tp_group)  # (S, B)
        loss_shape = targets.shape
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
        flat_targets = targets.reshape(-1)  # (N,)
        proj_weight = weight.to(hidden.dtype)  # (V/TP, D); matmuls in the input dtype
        n_tokens = flat_targets.numel()
        ctx.token_chunk = token_chunk or _default_token_chunk(n_tokens, m.vocab_slice_size, hidden.shape[-1])
        # needs_input_grad ignores no_grad mode; without the check, eval would pay for gradients.
        ctx.needs_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        ctx.needs_weight_grad = grad_enabled and ctx.needs_input_grad[1]

        if m.reduction == "none":
            per_token, lse = _per_token_forward(flat_hidden, proj_weight, flat_targets, m, ctx.token_chunk)
            ctx.save_for_backward(flat_hidden, proj_weight, flat_targets, lse)
            return (per_token * m.scale).reshape(loss_shape)

        if m.reduction == "mean":
            row_scale = m.scale / _mean_divisor(flat_targets, m)
        else:
            row_scale = torch.tensor(float(m.scale), dtype=torch.float64, device=flat_targets.device)
        loss, ctx.grad_hidden, ctx.grad_weight = _reduced_forward(
            flat_hidden, proj_weight, flat_targets, row_scale.to(m.accum_dtype), m, ctx.token_chunk,
            want_hidden=ctx.needs_hidden_grad, want_weight=ctx.needs_weight_grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        m: _ChunkMath = ctx.math
        if m.reduction == "none":
            flat_hidden, proj_weight, flat_targets, lse = ctx.saved_tensors
            row_weight = grad_loss.reshape(-1).to(m.accum_dtype) * m.scale  # (N,) upstream, per token
            row_weight = torch.where(flat_targets != m.ignore_index, row_weight, 0)
            grad_hidden, grad_weight = _chunked_grads(
                flat_hidden, proj_weight, flat_targets, lse, row_weight, m, ctx.token_chunk,
                want_hidden=ctx.needs_hidden_grad, want_weight=ctx.needs_weight_grad)
        else:
            grad_hidden = None if ctx.grad_hidden is None else ctx.grad_hidden * grad_loss
            grad_weight = None if ctx.grad_weight is None else ctx.grad_weight * grad_loss
        if grad_hidden is not None:
            grad_hidden = _full_hidden_grad(grad_hidden, ctx)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _full_hidden_grad(partial: torch.Tensor, ctx) -> torch.Tensor:
    """Sum this slice's hidden gradient over TP; under SP keep this rank's rows of the gathered sequence."""
    m: _ChunkMath = ctx.math
    full = all_reduce(partial, dist.ReduceOp.SUM, m.tp_group)  # (N, D) summed over vocab slices
    if m.sequence_parallel:
        local_rows = math.prod(ctx.local_hidden_shape[:-1])
        start = group_rank(m.tp_group) * local_rows
        full = full[start:start + local_rows]  # (S/SP * B, D)
    return full.to(ctx.hidden_dtype).reshape(ctx.local_hidden_shape)


def _gradient_buffers(hidden: torch.Tensor, weight: torch.Tensor, m: _ChunkMath, want_hidden: bool,
                      want_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    # Partial hidden grads are summed over TP later, so across ranks they accumulate in accum_dtype.
    hidden_dtype = hidden.dtype if group_size(m.tp_group) == 1 else m.accum_dtype
    grad_hidden = torch.empty(hidden.shape, dtype=hidden_dtype, device=hidden.device) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=m.accum_dtype, device=weight.device) if want_weight else None
    return grad_hidden, grad_weight


def _accumulate_grads(logit_grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, sl: slice,
                      grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None) -> None:
    logit_grad = logit_grad.to(hidden.dtype)  # (n, V/TP) back to the input dtype for the matmuls
    if grad_hidden is not None:
        grad_hidden[sl] = logit_grad @ weight  # (n, D), each token's row written once
    if grad_weight is not None:
        _add_weight_grad(grad_weight, logit_grad.T, hidden[sl])  # (V/TP, D) += (V/TP, n) @ (n, D)


def _add_weight_grad(grad_weight: torch.Tensor, logit_grad_t: torch.Tensor, hidden: torch.Tensor) -> None:
    """Add one chunk's weight gradient without rounding the product to the input dtype first.

    Rounding every chunk's product to bf16 before an fp32 add would quietly reintroduce the bf16
    accumulation the contract rules out; an ``accum_dtype`` of bf16 keeps it, by design.
    """
    if grad_weight.dtype == logit_grad_t.dtype:
        grad_weight.addmm_(logit_grad_t, hidden)
    elif logit_grad_t.is_cuda and grad_weight.dtype == torch.float32:
        # bf16 tensor cores accumulating straight into the fp32 buffer (no product-sized temporary)
        torch.addmm(grad_weight, logit_grad_t, hidden, out_dtype=torch.float32, out=grad_weight)
    else:  # CPU (no mixed-dtype mm there): exact upcast of the low-precision operands, then one wide matmul
        grad_weight.addmm_(logit_grad_t.to(grad_weight.dtype), hidden.to(grad_weight.dtype))


def _reduced_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                     m: _ChunkMath, token_chunk: int, *, want_hidden: bool, want_weight: bool):
    """Loss of a ``mean``/``sum`` reduction, and its gradients for an upstream gradient of 1."""
    grad_hidden, grad_weight = _gradient_buffers(hidden, weight, m, want_hidden, want_weight)
    # The loss total is not one of the contract's accumulators; keep it at least fp32 so a bf16
    # accumulator contract shows up where FAULTS.md says it does (dW worst, loss least).
    loss = torch.zeros((), dtype=_loss_dtype(m), device=hidden.device)
    for start in _chunks(targets.numel(), token_chunk):
        sl = slice(start, start + token_chunk)
        logits, tanh = _project(hidden[sl], weight, m)  # (n, V/TP)
        rows = _locate_targets(targets[sl], m)
        chunk = _chunk_loss(logits, targets[sl], rows, m)
        loss += chunk.loss.sum() * row_scale
        if want_hidden or want_weight:
            row_weight = torch.where(targets[sl] != m.ignore_index, row_scale, 0)  # (n,)
            logit_grad = _logit_grad(chunk.probs, tanh, chunk.lse, rows, row_weight, m)
            _accumulate_grads(logit_grad, hidden, weight, sl, grad_hidden, grad_weight)
    return loss, grad_hidden, grad_weight


def _per_token_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, m: _ChunkMath,
                       token_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses and log-sum-exps (N,); no gradients, since the upstream ones are not known yet."""
    losses = torch.empty(targets.shape, dtype=_loss_dtype(m), device=hidden.device)
    lses = torch.empty(targets.shape, dtype=m.accum_dtype, device=hidden.device)
    for start in _chunks(targets.numel(), token_chunk):
        sl = slice(start, start + token_chunk)
        logits, _ = _project(hidden[sl], weight, m)
        chunk = _chunk_loss(logits, targets[sl], _locate_targets(targets[sl], m), m)
        losses[sl], lses[sl] = chunk.loss, chunk.lse
    return losses, lses


def _chunked_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                   row_weight: torch.Tensor, m: _ChunkMath, token_chunk: int, *, want_hidden: bool,
                   want_weight: bool):
    """Recompute each chunk's softmax from the saved lse (no collectives) and weight rows by upstream grads."""
    grad_hidden, grad_weight = _gradient_buffers(hidden, weight, m, want_hidden, want_weight)
    for start in _chunks(targets.numel(), token_chunk):
        sl = slice(start, start + token_chunk)
        logits, tanh = _project(hidden[sl], weight, m)  # (n, V/TP)
        probs = logits.sub_(lse[sl, None]).exp_()  # (n, V/TP)
        logit_grad = _logit_grad(probs, tanh, lse[sl], _locate_targets(targets[sl], m), row_weight[sl], m)
        _accumulate_grads(logit_grad, hidden, weight, sl, grad_hidden, grad_weight)
    return grad_hidden, grad_weight


def _default_token_chunk(n_tokens: int, vocab_slice: int, hidden_size: int) -> int:
    """Tokens per chunk so one chunk's logits are about as large as the hidden states (Liger's rule)."""
    chunk = math.ceil(max(n_tokens, 1) / math.ceil(vocab_slice / hidden_size))
    return 1 << (chunk - 1).bit_length()


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               contract: CEContract, token_chunk: int | None = None,
                               fault: SeamFault | str | None = None, fault_scale: int = 2) -> torch.Tensor:
    """Functional form of :class:`FusedLinearCrossEntropy` (no shape validation; the module does that)."""
    m = _resolve_math(contract, None if fault is None else SeamFault(fault), fault_scale)
    return _FusedLinearCrossEntropyFn.apply(hidden, weight, targets, m, token_chunk, torch.is_grad_enabled())


def make_output_weight(hidden_size: int, rows: int, weight: nn.Parameter | None, *, owner: str,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Parameter:
    """The output projection ``(rows, hidden_size)``: a fresh one, or a borrowed one (tied embeddings)."""
    if not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"{owner}: `hidden_size` must be a positive int, got {hidden_size!r}.")
    if weight is None:
        fresh = torch.empty(rows, hidden_size, device=device, dtype=dtype)
        return nn.Parameter(nn.init.normal_(fresh, std=hidden_size ** -0.5))
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"{owner}: `weight` must be an nn.Parameter to borrow (e.g. the tied embedding's"
                         f" `.weight`), got {type(weight).__name__}. Wrap it with nn.Parameter or pass None.")
    if tuple(weight.shape) != (rows, hidden_size):
        raise ValueError(f"{owner}: `weight` must have shape (vocab_end - vocab_start, hidden_size) ="
                         f" ({rows}, {hidden_size}), found {tuple(weight.shape)}. Pass this rank's vocab slice"
                         " of the output weight, or fix the contract's vocab_start/vocab_end.")
    return weight


class FusedLinearCrossEntropy(nn.Module):
    """Output projection + cross-entropy that never materialises ``[N, V]`` logits, honouring a ``CEContract``.

    Args:
        hidden_size: D, the last dim of ``hidden``.
        contract: the promises this layer keeps; exposed as ``ce_contract`` for the parity callback.
        weight: an existing ``nn.Parameter`` of shape ``(vocab_end - vocab_start, hidden_size)`` to
            borrow (tied embeddings); ``None`` creates one.
        token_chunk: tokens per chunk; ``None`` picks about ``N * D / (V/TP)`` so a logits chunk is
            about the size of the hidden states.
        fault: for demonstrations and tests only: the layer keeps declaring its honest contract while
            computing the broken thing (see :class:`ce_guard.faults.SeamFault`).
        fault_scale: the integer k of ``SeamFault.GRAD_SCALE``.
        device, dtype: of a freshly created weight.

    Raises:
        ValueError: on a weight of the wrong shape or type, a bad ``token_chunk``, an unknown fault,
            or a vocab slice that is not the whole vocabulary with no TP group to reduce over.

    Example:
        >>> head = FusedLinearCrossEntropy(64, CEContract(vocab_size=1000, label_smoothing=0.1))
        >>> loss = head(torch.randn(4, 16, 64), torch.randint(0, 1000, (4, 16)))
    """

    def __init__(self, hidden_size: int, contract: CEContract, *, weight: nn.Parameter | None = None,
                 token_chunk: int | None = None, fault: SeamFault | str | None = None, fault_scale: int = 2,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        if not isinstance(contract, CEContract):
            raise ValueError(f"{owner}: `contract` must be a CEContract, got {type(contract).__name__}.")
        if token_chunk is not None and (not isinstance(token_chunk, int) or token_chunk <= 0):
            raise ValueError(f"{owner}: `token_chunk` must be None or a positive int, got {token_chunk!r}.")
        if fault is not None and fault not in set(SeamFault):
            raise ValueError(f"{owner}: `fault` must be None or one of {[f.value for f in SeamFault]},"
                             f" got {fault!r}.")
        if not isinstance(fault_scale, int) or fault_scale < 1:
            raise ValueError(f"{owner}: `fault_scale` must be an int >= 1, got {fault_scale!r}.")
        if not contract.is_full_vocab and contract.layout != "[N,V]" and group_size(contract.tp_group) == 1:
            raise ValueError(f"{owner}: the contract's vocab slice [{contract.vocab_start}, {contract.vocab_end})"
                             f" is not the whole vocabulary ({contract.vocab_size}) but `tp_group` has one rank,"
                             " so the other slices' logits would never be reduced. Pass the TP process group.")
        self.hidden_size = hidden_size
        self.ce_contract = contract
        self.token_chunk = token_chunk
        self.fault = None if fault is None else SeamFault(fault)
        self.fault_scale = fault_scale
        self.weight = make_output_weight(hidden_size, contract.vocab_slice_size, weight, owner=owner,
                                         device=device, dtype=dtype)
        self._math = _resolve_math(contract, self.fault, fault_scale)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of ``hidden`` ``[..., D]`` against ``targets`` ``[...]`` (int64), in fp32 or ``accum_dtype`` if wider.

        Scalar for ``mean``/``sum``; ``targets``' shape for ``none`` (the gathered sequence under SP).
        """
        owner = type(self).__name__
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"{owner}: `hidden` last dim must be hidden_size={self.hidden_size},"
                             f" found shape {tuple(hidden.shape)}.")
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(f"{owner}: `targets` shape must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])},"
                             f" found {tuple(targets.shape)}.")
        if targets.dtype != torch.int64:
            raise ValueError(f"{owner}: `targets` must be int64 class ids, found {targets.dtype}."
                             " Cast with targets.long().")
        return _FusedLinearCrossEntropyFn.apply(hidden, self.weight, targets, self._math, self.token_chunk,
                                                torch.is_grad_enabled())

    def extra_repr(self) -> str:
        fault = f", fault={self.fault.value}" if self.fault else ""
        return f"hidden_size={self.hidden_size}, {self.ce_contract}, token_chunk={self.token_chunk}{fault}"
