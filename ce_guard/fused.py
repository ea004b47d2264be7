"""ce_guard's own fused linear + cross-entropy output layer: chunked over tokens, vocab-parallel aware.

The ``[N, V]`` logits are never held. For ``mean`` and ``sum`` each chunk of tokens is projected,
reduced to its loss and to its gradients during forward, then dropped (Liger's design); backward only
scales them by the upstream gradient. For ``none`` the upstream gradient differs per token and is
unknown at forward time, so forward keeps the per-token log-sum-exp and backward recomputes each chunk.

On CUDA, for ``mean``/``sum`` without softcap, each chunk's softmax, loss and logit gradient run as
Triton kernels (``ce_guard._triton_ce``) that overwrite the chunk's logits with dLoss/dz in place (two
reads and one write of the chunk instead of a dozen elementwise kernels and an fp32 copy): one kernel
on a whole vocabulary, a statistics kernel, the TP all-reduces and a gradient kernel on a vocab slice.
Chunks are larger there, and ignored tokens are left out of the matmuls. Everything else, and every
fault, runs the plain-torch chunk math below. Timings: docs/benchmarks.md, "Output layer" and "TP".

Everything here is derived from the ``CEContract`` alone and shares no code with
``ce_guard.reference``: the guard compares two independent derivations of the same promises.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from ce_guard._dist import all_gather_dim0, all_reduce, group_rank, group_size
from ce_guard._matmul import reduction_blocks
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
    scale: float = 1  # fault: loss and grads times this
    torch_math_only: bool = False  # faults: keep the plain-torch chunk math their signatures were documented on

    @property
    def vocab_slice_size(self) -> int:
        return self.vocab_end - self.vocab_start


def _resolve_math(contract: CEContract, fault: SeamFault | None, fault_scale: float) -> _ChunkMath:
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
    return dataclasses.replace(honest, torch_math_only=True, **edits)


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
    row_max = all_reduce(logits.amax(dim=1), dist.ReduceOp.MAX, m.tp_group)  # (n,) over TP
    target_logit = torch.where(rows.owned, logits.gather(1, rows.row[:, None]).squeeze(1), 0)  # (n,)
    logit_sum = logits.sum(dim=1) if m.label_smoothing else torch.zeros_like(row_max)  # (n,) this slice's sum_v z_v
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
    loss = _token_loss(lse, target_logit, mean_logit, targets, m)
    return _ChunkLoss(lse, loss, probs.div_(denominator[:, None]))


def _token_loss(lse: torch.Tensor, target_logit: torch.Tensor, mean_logit: torch.Tensor, targets: torch.Tensor,
                m: _ChunkMath) -> torch.Tensor:
    """``(1-eps)(lse - z_y) + eps(lse - mean_v z) + z_loss lse^2`` per token (n,), 0 on ignored tokens."""
    eps = m.label_smoothing
    loss = lse - (1 - eps) * target_logit - eps * mean_logit
    if m.z_loss:
        loss = loss + m.z_loss * lse.square()
    return torch.where(targets != m.ignore_index, loss, 0)


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


Rows = slice | torch.Tensor  # a chunk's tokens: a run of rows, or the (n,) ids of visible tokens


def _token_chunks(targets: torch.Tensor, m: _ChunkMath, token_chunk: int, *, skip_ignored: bool) -> list[Rows]:
    """Each chunk's rows. With ``skip_ignored``, only visible tokens, gathered by id (one host sync).

    Ignored tokens add nothing to the loss, the count or the gradients, so their share of the three
    matmuls is wasted work (1/17 of the benchmark's tokens, far more in prompt-masked fine-tuning).
    """
    n_tokens = targets.numel()
    if skip_ignored:
        visible = (targets != m.ignore_index).nonzero().squeeze(1)  # (n_visible,); its size syncs the host
        if visible.numel() < n_tokens:
            return [ids for ids in visible.split(token_chunk) if ids.numel()]
    return [slice(start, start + token_chunk) for start in _chunks(n_tokens, token_chunk)]


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
        if token_chunk is None and _kernel_applies(flat_hidden, m):
            token_chunk = _kernel_token_chunk(n_tokens, m.vocab_slice_size, flat_hidden.element_size())
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
        loss, grad_hidden, grad_weight = _reduced_forward(
            flat_hidden, proj_weight, flat_targets, row_scale, m, ctx.token_chunk,
            want_hidden=ctx.needs_hidden_grad, want_weight=ctx.needs_weight_grad)
        # Saved (not kept as attributes) so a backward without retain_graph frees them as it returns.
        ctx.save_for_backward(grad_hidden, grad_weight)
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
            saved_hidden, saved_weight = ctx.saved_tensors
            # Under TP the hidden gradient is all-reduced in place next: it must not alias the saved one.
            grad_hidden = _times_upstream(saved_hidden, grad_loss, may_alias=group_size(m.tp_group) == 1)
            grad_weight = _times_upstream(saved_weight, grad_loss, dtype=ctx.weight_dtype, may_alias=True)
        if grad_hidden is not None:
            grad_hidden = _full_hidden_grad(grad_hidden, ctx)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _times_upstream(saved: torch.Tensor | None, grad_loss: torch.Tensor, *, dtype: torch.dtype | None = None,
                    may_alias: bool) -> torch.Tensor | None:
    """A precomputed gradient times the upstream one, rounded once to ``dtype`` (default: ``saved``'s).

    When the upstream gradient is exactly 1 (a plain ``loss.backward()``) and no cast is needed, the
    saved tensor itself is handed over, as Liger does: a product would put a second weight-sized copy
    on the memory peak. The check costs one host sync per backward.
    """
    if saved is None:
        return None
    dtype = dtype or saved.dtype
    if may_alias and saved.dtype == dtype and bool(grad_loss == 1):
        return saved
    product = torch.empty_like(saved, dtype=dtype)
    if saved.is_cuda and saved.dtype == torch.float32 and saved.is_contiguous() and _triton_available():
        _scale_cast(saved, grad_loss, product)
    else:
        torch.mul(saved, grad_loss, out=product)
    return product


SCALE_CAST_BLOCK = 8192


def _scale_cast(source: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out = source * scale`` in fp32, rounded once to ``out``'s dtype, in one vectorised pass.

    torch's ``mul(out=)`` into a narrower dtype runs a non-vectorised kernel, in two launches once the
    source passes 2^31 bytes: 2.9 ms for the fp32 dW at V x D = 152k x 4096 on an H200, 3% of the layer.
    """
    n_elements = source.numel()
    _triton_kernels().scale_cast[(-(-n_elements // SCALE_CAST_BLOCK),)](
        source, scale.to(torch.float32), out, n_elements, BLOCK=SCALE_CAST_BLOCK, num_warps=8)


def _full_hidden_grad(partial: torch.Tensor, ctx) -> torch.Tensor:
    """Sum this slice's hidden gradient over TP; under SP keep this rank's rows of the gathered sequence."""
    m: _ChunkMath = ctx.math
    full = all_reduce(partial, dist.ReduceOp.SUM, m.tp_group)  # (N, D) summed over vocab slices
    if m.sequence_parallel:
        local_rows = math.prod(ctx.local_hidden_shape[:-1])
        start = group_rank(m.tp_group) * local_rows
        full = full[start:start + local_rows]  # (S/SP * B, D)
    return full.to(ctx.hidden_dtype).reshape(ctx.local_hidden_shape)


def _gradient_buffers(hidden: torch.Tensor, weight: torch.Tensor, m: _ChunkMath, chunks: list[Rows],
                      want_hidden: bool, want_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    # Partial hidden grads are summed over TP later, so across ranks they accumulate in accum_dtype (or wider).
    hidden_dtype = hidden.dtype if group_size(m.tp_group) == 1 else torch.promote_types(hidden.dtype, m.accum_dtype)
    # Zeros only where the chunks leave something unwritten: ignored rows that were skipped, or a dW
    # that no chunk overwrites (the first chunk's matmul ignores the old contents, beta=0).
    every_row = bool(chunks) and all(isinstance(rows, slice) for rows in chunks)
    new_hidden = torch.empty if every_row else torch.zeros
    new_weight = torch.empty if chunks else torch.zeros
    grad_hidden = new_hidden(hidden.shape, dtype=hidden_dtype, device=hidden.device) if want_hidden else None
    grad_weight = new_weight(weight.shape, dtype=m.accum_dtype, device=weight.device) if want_weight else None
    return grad_hidden, grad_weight


def _accumulate_grads(logit_grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, rows: Rows,
                      grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None, *, first: bool) -> None:
    """Add one chunk's share: its rows of dL/dh (written once) and its term of dL/dW (the first overwrites).

    ``hidden`` is the chunk's own (n, D) rows.
    """
    logit_grad = logit_grad.to(hidden.dtype)  # (n, V/TP) back to the input dtype for the matmuls
    if grad_hidden is not None:
        if isinstance(rows, slice):  # (n, D) straight into its rows, no temporary
            _matmul_into(grad_hidden[rows], logit_grad, weight, accumulate=False)
        else:  # (n, D) scattered to the visible tokens' rows
            product = torch.empty(logit_grad.shape[0], weight.shape[1], dtype=grad_hidden.dtype,
                                  device=grad_hidden.device)
            _matmul_into(product, logit_grad, weight, accumulate=False)
            grad_hidden.index_copy_(0, rows, product)
    if grad_weight is not None:  # (V/TP, D) += (V/TP, n) @ (n, D)
        _matmul_into(grad_weight, logit_grad.T, hidden, accumulate=not first)


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """``out (+)= a @ b`` without rounding the product to the operands' dtype first.

    Rounding every chunk's product to bf16 before an fp32 add would quietly reintroduce the bf16
    accumulation the contract rules out (for dW across chunks; for dL/dh across TP ranks, whose partial
    sums are added later); an ``accum_dtype`` of bf16 keeps it, by design (the matmul still sums each
    chunk's tokens in fp32 and rounds the running total once per chunk). A first write ignores ``out``'s
    old contents, so it needs no zeroed buffer. fp32 on CUDA sums in blocks (``ce_guard._matmul``).
    """
    # On CUDA, 16-bit tensor cores accumulate straight into an fp32 buffer (no product-sized temporary).
    mixed = a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and out.dtype == torch.float32
    if out.dtype != a.dtype and not mixed:
        a, b = a.to(out.dtype), b.to(out.dtype)  # elsewhere there is no mixed-dtype mm: the buffer's dtype
    out_dtype = {"out_dtype": torch.float32} if mixed else {}
    for i, block in enumerate(reduction_blocks(a, out)):
        if accumulate or i > 0:
            torch.addmm(out, a[:, block], b[block], out=out, **out_dtype)
        else:
            torch.mm(a[:, block], b[block], out=out, **out_dtype)


def _reduced_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                     m: _ChunkMath, token_chunk: int, *, want_hidden: bool, want_weight: bool):
    """Loss of a ``mean``/``sum`` reduction, and its gradients for an upstream gradient of 1.

    ``row_scale`` (0-dim, float64) is each visible token's weight: the mean's 1/count, times a fault's scale.
    """
    want_grads = want_hidden or want_weight
    use_kernel = _kernel_applies(hidden, m)
    chunks = _token_chunks(targets, m, token_chunk, skip_ignored=use_kernel)
    grad_hidden, grad_weight = _gradient_buffers(hidden, weight, m, chunks, want_hidden, want_weight)
    # The kernel keeps its softmax and token weights in fp32 whatever the contract's floor; the torch
    # math holds them in accum_dtype, as the contract (or a fault) states.
    row_scale = row_scale.to(torch.float32 if use_kernel else m.accum_dtype)
    # The loss total is not one of the contract's accumulators; keep it at least fp32 so a bf16
    # accumulator contract shows up where docs/faults.md #3 says it does (dW worst, loss least).
    loss = torch.zeros((), dtype=_loss_dtype(m), device=hidden.device)
    chunk_step = _kernel_chunk if use_kernel else _torch_chunk
    for i, rows in enumerate(chunks):
        chunk_hidden = hidden[rows]  # (n, D): a view of a run of rows, or the visible rows gathered
        chunk_loss, logit_grad = chunk_step(chunk_hidden, weight, targets[rows], row_scale, m, want_grads)
        loss += chunk_loss.sum() * row_scale
        if want_grads:
            _accumulate_grads(logit_grad, chunk_hidden, weight, rows, grad_hidden, grad_weight, first=i == 0)
        del logit_grad  # before the next chunk's logits exist: one (n, V/TP) buffer at a time
    return loss, grad_hidden, grad_weight


def _torch_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                 m: _ChunkMath, want_grads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's per-token losses (n,) and dLoss/dz (n, V/TP) for visible tokens weighted by ``row_scale``."""
    logits, tanh = _project(hidden, weight, m)  # (n, V/TP)
    rows = _locate_targets(targets, m)
    chunk = _chunk_loss(logits, targets, rows, m)
    if not want_grads:
        return chunk.loss, None
    row_weight = torch.where(targets != m.ignore_index, row_scale, 0)  # (n,)
    return chunk.loss, _logit_grad(chunk.probs, tanh, chunk.lse, rows, row_weight, m)


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
        del logits, chunk  # one (n, V/TP) buffer at a time
    return losses, lses


def _chunked_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                   row_weight: torch.Tensor, m: _ChunkMath, token_chunk: int, *, want_hidden: bool,
                   want_weight: bool):
    """Recompute each chunk's softmax from the saved lse (no collectives) and weight rows by upstream grads."""
    chunks = _token_chunks(targets, m, token_chunk, skip_ignored=False)
    grad_hidden, grad_weight = _gradient_buffers(hidden, weight, m, chunks, want_hidden, want_weight)
    for i, sl in enumerate(chunks):
        logits, tanh = _project(hidden[sl], weight, m)  # (n, V/TP)
        probs = logits.sub_(lse[sl, None]).exp_()  # (n, V/TP)
        logit_grad = _logit_grad(probs, tanh, lse[sl], _locate_targets(targets[sl], m), row_weight[sl], m)
        _accumulate_grads(logit_grad, hidden[sl], weight, sl, grad_hidden, grad_weight, first=i == 0)
        del logits, probs, logit_grad  # one (n, V/TP) buffer at a time
    return grad_hidden, grad_weight


MIN_TOKEN_CHUNK = 256  # below this the chunk loop's per-chunk overhead dominates (2 tokens at D=128, V=100k)


def _default_token_chunk(n_tokens: int, vocab_slice: int, hidden_size: int) -> int:
    """Tokens per chunk so one chunk's logits are about as large as the hidden states (Liger's rule), at least
    ``MIN_TOKEN_CHUNK``."""
    chunk = max(math.ceil(max(n_tokens, 1) / math.ceil(vocab_slice / hidden_size)), MIN_TOKEN_CHUNK)
    return 1 << (chunk - 1).bit_length()


# --- CUDA fast path: Triton kernels for each chunk's softmax, loss and logit gradient ---------------------

_KERNEL_LOGITS_BYTES = 1_250_000_000  # one chunk's logits: ~4096 tokens at V=152k in bf16 (see docs/benchmarks.md)
_KERNEL_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _kernel_applies(hidden: torch.Tensor, m: _ChunkMath) -> bool:
    """Whether this forward's chunks run :func:`_kernel_chunk`: CUDA tensors, Triton, and math it covers."""
    return hidden.is_cuda and _kernel_covers(m, hidden.dtype) and _triton_available()


def _kernel_covers(m: _ChunkMath, input_dtype: torch.dtype) -> bool:
    """``mean``/``sum`` without softcap or fault, dW accumulated in fp32 or in the input dtype itself."""
    return (m.reduction != "none" and not m.torch_math_only and m.softcap is None
            and input_dtype in _KERNEL_INPUT_DTYPES and m.accum_dtype in (torch.float32, input_dtype))


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernel_token_chunk(n_tokens: int, vocab_slice: int, itemsize: int) -> int:
    """The largest power-of-two chunk whose logits fit ``_KERNEL_LOGITS_BYTES``, at most all tokens.

    Larger than Liger's rule: fewer, fuller matmuls and fewer passes over the dW accumulator, which
    at V x D = 152k x 4096 is itself 1.2 GB (bf16) or 2.5 GB (fp32) of traffic per chunk.
    """
    fit = max(1, _KERNEL_LOGITS_BYTES // (vocab_slice * itemsize))
    return min(1 << (fit.bit_length() - 1), 1 << (max(n_tokens, 1) - 1).bit_length())


def _kernel_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                  m: _ChunkMath, want_grads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_torch_chunk`'s results from one matmul and Triton kernels; the logit gradient overwrites the logits.

    On one rank's whole vocabulary a single kernel does it all. On a vocab slice the softmax statistics
    must be reduced over TP between the two passes, so a statistics kernel runs, then the all-reduces
    (:func:`_chunk_loss`'s, on ``(n,)`` vectors), then a gradient kernel.
    """
    logits = hidden @ weight.T  # (n, V/TP) in the input dtype, as the torch path's matmul
    n_rows, n_cols = logits.shape
    block = min(4096, 1 << (n_cols - 1).bit_length())
    launch = dict(BLOCK=block, num_warps=8 if block >= 2048 else 4)
    kernels = _triton_kernels()
    if group_size(m.tp_group) == 1:
        losses = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)  # (n,)
        kernels.whole_row[(n_rows,)](logits, logits.stride(0), targets, row_scale, losses, n_cols, m.ignore_index,
                                     float(m.label_smoothing), float(m.z_loss), WRITE_GRAD=want_grads, **launch)
        return losses, logits if want_grads else None

    stats = torch.empty(4, n_rows, dtype=torch.float32, device=hidden.device)  # max, denominator, z_y, sum_v z_v
    kernels.slice_statistics[(n_rows,)](logits, logits.stride(0), targets, stats, n_rows, n_cols, m.vocab_start,
                                         m.ignore_index, **launch)
    row_max, local_denominator, target_logit, logit_sum = stats.unbind(0)  # this slice's (n,) each
    global_max = all_reduce(row_max.clone(), dist.ReduceOp.MAX, m.tp_group)
    sums = torch.stack([local_denominator * torch.exp(row_max - global_max), target_logit, logit_sum])
    denominator, target_logit, logit_sum = all_reduce(sums, dist.ReduceOp.SUM, m.tp_group).unbind(0)
    lse = global_max + denominator.log()  # (n,) over the global vocab
    losses = _token_loss(lse, target_logit, logit_sum / m.vocab_size, targets, m)
    if not want_grads:
        return losses, None
    kernels.slice_grad[(n_rows,)](logits, logits.stride(0), targets, lse, row_scale, n_cols, m.vocab_start,
                                  m.vocab_size, m.ignore_index, float(m.label_smoothing), float(m.z_loss), **launch)
    return losses, logits


def _triton_kernels():
    """Import-on-first-use, so that importing ce_guard needs no Triton (CPU machines, CI)."""
    from ce_guard import _triton_ce

    return _triton_ce


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               contract: CEContract, token_chunk: int | None = None,
                               fault: SeamFault | str | None = None, fault_scale: float = 2) -> torch.Tensor:
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
            about the size of the hidden states, or on the CUDA kernel path the largest power of two
            whose logits fit ~1.25 GB (4096 tokens at V=152k in bf16). Memory beyond the gradients is
            about one logits chunk, plus the fp32 dW accumulator unless the contract's
            ``accum_dtype`` is the weight's dtype: ``accum_dtype=torch.bfloat16, token_chunk=512``
            is the low-memory setting (~0.16 GB at V=152k, D=4096; dW rounded once per chunk).
        fault: for demonstrations and tests only: the layer keeps declaring its honest contract while
            computing the broken thing (see :class:`ce_guard.faults.SeamFault`).
        fault_scale: the factor of ``SeamFault.GRAD_SCALE``: an integer k for a divide missing or doubled,
            any other positive number for a divide by another count (applied before any rounding).
        device, dtype: of a freshly created weight.

    Raises:
        ValueError: on a weight of the wrong shape or type, a bad ``token_chunk``, an unknown fault,
            or a vocab slice that is not the whole vocabulary with no TP group to reduce over.

    Example:
        >>> head = FusedLinearCrossEntropy(64, CEContract(vocab_size=1000, label_smoothing=0.1))
        >>> loss = head(torch.randn(4, 16, 64), torch.randint(0, 1000, (4, 16)))
    """

    def __init__(self, hidden_size: int, contract: CEContract, *, weight: nn.Parameter | None = None,
                 token_chunk: int | None = None, fault: SeamFault | str | None = None, fault_scale: float = 2,
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
        if isinstance(fault_scale, bool) or not isinstance(fault_scale, (int, float)) or not 0 < fault_scale < math.inf:
            raise ValueError(f"{owner}: `fault_scale` must be a positive finite number, got {fault_scale!r}.")
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
