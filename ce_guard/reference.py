"""The trusted cross-entropy path: chunked, fp32 accumulation throughout, every collective explicit.

Shares no math with any fused path. It reads only the contract and the tensors, and returns the loss,
the per-token losses and the gradients w.r.t. hidden and the weight slice *directly* (no autograd):
the callback compares gradients the training backward produced, so the reference must hand back
numbers, not a graph. ``[N, V]`` logits are never materialised: each step holds one
``(token_chunk, vocab_chunk)`` fp32 block at a time, so peak extra memory on CUDA is ``~2 * chunk_elements * 4``
bytes plus one hidden chunk and one weight block in the backward operands' dtype (eager CPU steps hold a
few more blocks).

Logits are exact: fp32 operands run without TF32, and bf16/fp16 operands on CUDA run on tensor cores
with an fp32 output (a 16-bit product is exact in fp32); the contract's logit multiplier and softcap are
applied to that fp32 block. The backward products take their operands in
``backward_dtype``: fp32 (exact; the default on CPU and for fp32 inputs) or, by default for 16-bit inputs
on CUDA, fp16. There hidden and weight enter fp16 exactly (bf16's 8 significant bits fit in fp16's 11,
scaled by powers of two into its range) and the fp32 logit gradient is rounded once to fp16 after a
power-of-two scale per token: a relative error under 2**-11 per element, an eighth of the bf16 rounding
that the paths it judges carry, for one tensor-core matmul per product instead of the two a bf16
high/low split needs. On CUDA each block's elementwise math is ``torch.compile``d (one read of the
block instead of one per eager op; the first call compiles for ~15 s). Costs: docs/benchmarks.md.

Two passes per call:
  1. statistics: per token, fp32 running max / denominator over local vocab blocks, the target logit
     (only where the target is inside this rank's slice) and the logit sum; then one all-reduce each
     over the TP group (MAX, SUM, SUM, SUM) and one SUM of the visible-token count over the token group;
  2. gradients: recompute each logit block, form dL/dlogits, accumulate dL/dh and dL/dW in fp32, and
     all-reduce dL/dh over the TP group (each rank holds only its vocab slice's contribution). A z-loss over
     all positions gives ignored rows their own gradient; a logit multiplier scales both sums once at the end.
     An L2-warp penalty (fla's) adds, on every row, a gradient-only term at its argmax (one more logits pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ce_guard import _dist
from ce_guard._compile import compiled_on_cuda
from ce_guard._exact_products import (FP16_EXPONENT, abs_max, add_product, ceil_log2, default_backward_dtype,
                                      exact_fp32_matmul, exact_mm, pow2)
from ce_guard._reference_inputs import validate_reference_inputs
from ce_guard._reference_weights import divisor as _divisor, l2_warp_per_row, upstream_per_token, z_loss_per_row
from ce_guard.contract import CEContract

DEFAULT_CHUNK_ELEMENTS = 1 << 26  # 64M fp32 logits per block: 256 MiB, ~0.7 GB live in all at V = 152k
DEFAULT_TOKEN_CHUNK = 16384  # 16384 x 4096 blocks: dL/dW written once per call (docs/benchmarks.md)


@dataclass(frozen=True)
class ReferenceResult:
    """What the contract says the seam should have produced, in fp32.

    ``loss`` is a scalar for ``mean``/``sum`` and a per-token tensor for ``none`` (shape of targets); under
    ``z_loss_positions='all'`` it holds the z-loss over every row, which ``per_token_loss`` leaves out.
    ``grad_hidden`` has hidden's shape (this rank's tokens; full, i.e. summed over the TP group);
    ``grad_weight`` has the weight slice's shape; both are ``None`` when gradients were not asked for.
    Per-token tensors (``per_token_loss``, ``lse``, ``mean_logit*``, ``targets``) cover this rank's local
    tokens, flat.
    """

    loss: torch.Tensor
    per_token_loss: torch.Tensor
    lse: torch.Tensor
    mean_logit: torch.Tensor        # mean over the global vocab, per token
    mean_logit_local: torch.Tensor  # mean over this rank's slice, per token
    targets: torch.Tensor
    grad_hidden: torch.Tensor | None
    grad_weight: torch.Tensor | None
    token_weight: torch.Tensor | None  # dLoss/dper-token loss of this rank's tokens, flat (0 where ignored)
    n_tokens: int          # tokens in the reference's view (the gathered sequence under SP)
    n_visible: int         # non-ignored tokens in that view
    n_visible_shard: int   # non-ignored tokens this rank brought (differs from n_visible only under SP)
    n_visible_global: int  # non-ignored tokens summed over the token group
    divisor: float         # what the mean divided by (the given count under given_count; 1.0 for sum / none)
    tp_size: int
    token_group_size: int
    nonfinite_inputs: dict[str, int]


def reference_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    contract: CEContract,
    *,
    grad_output: torch.Tensor | float | None = 1.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
    backward_dtype: torch.dtype | None = None,
    given_count: float | torch.Tensor | None = None,
) -> ReferenceResult:
    """Cross-entropy of ``hidden @ weight.T`` against ``targets`` exactly as ``contract`` defines it.

    Args:
        hidden: ``[..., D]`` activations entering the output layer (this rank's shard under SP).
        weight: ``[V_local, D]`` this rank's vocab slice ``[contract.vocab_start, contract.vocab_end)``.
        targets: integer ids of hidden's leading shape; ``contract.ignore_index`` marks padding.
        contract: the promises to hold the seam to.
        grad_output: upstream gradient of the loss: a scalar for ``mean``/``sum``; for ``none`` a tensor
            of targets' shape (or a scalar applied to every token); ``None`` skips the gradient pass.
        chunk_elements: upper bound on the logits held at once (token chunk x vocab chunk).
        token_chunk: tokens per chunk; the vocab chunk is ``chunk_elements // token_chunk``.
        backward_dtype: operands of the gradient matmuls: ``torch.float32`` (exact products) or
            ``torch.float16`` (the logit gradient rounded once to fp16, per-token scaled; see the module
            docstring). ``None`` picks fp16 for bf16/fp16 inputs on CUDA and fp32 otherwise.
        given_count: the count a ``normalize_by='given_count'`` mean divides by, handed in with each step
            (transformers' ``num_items_in_batch``); a finite number > 0, or a one-element tensor. Only for
            that contract.

    Returns:
        A :class:`ReferenceResult`.

    Raises:
        ValueError: shapes, dtypes, targets, chunk sizes or a ``given_count`` that break the contract.

    Example:
        >>> c = CEContract(vocab_size=10)
        >>> r = reference_linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, -100]), c)
        >>> r.loss.shape, r.grad_hidden.shape
        (torch.Size([]), torch.Size([4, 8]))
    """
    validate_reference_inputs(hidden, weight, targets, contract, grad_output, chunk_elements, token_chunk,
                              backward_dtype, given_count)
    given_count = None if given_count is None else float(given_count)
    tp, token_group = contract.tp_group, contract.token_group
    tp_size = _dist.group_size(tp)
    nonfinite = {"hidden": count_nonfinite(hidden), "weight": count_nonfinite(weight)}

    local_shape = targets.shape
    targets = targets.long()                   # any integer dtype in; gather and scatter need int64
    h = hidden.reshape(-1, hidden.shape[-1])  # (N_local, D)
    y = targets.reshape(-1)                    # (N_local,)
    if contract.sequence_parallel:            # [S/SP,B,D] -> gather the sequence: (S*B, D) in rank order
        h = _dist.all_gather_dim0(hidden, tp).reshape(-1, hidden.shape[-1])
        y = _dist.all_gather_dim0(targets, tp).reshape(-1)
    n, d = h.shape
    vocab_chunk = max(1, chunk_elements // min(token_chunk, max(n, 1)))

    with exact_fp32_matmul():
        lse, target_logit, logit_sum, logit_sum_local = _softmax_statistics(h, weight, y, contract, token_chunk, vocab_chunk)
        visible = y != contract.ignore_index
        # Per token, fp32: (1-eps) * nll + eps * (lse - mean_v z_v) (+ z * lse^2 if counted); ignored tokens 0.
        eps = contract.label_smoothing
        per_token = (1.0 - eps) * (lse - target_logit) + eps * (lse - logit_sum / contract.vocab_size)
        if contract.z_loss_positions == "counted":
            per_token = per_token + contract.z_loss * lse.square()
        per_token = torch.where(visible, per_token, torch.zeros_like(per_token))

        n_visible = int(visible.sum())
        count = torch.tensor([n_visible], dtype=torch.float64, device=h.device)
        _dist.all_reduce(count, dist.ReduceOp.SUM, token_group)  # non-ignored tokens over the token group
        n_visible_global = int(count.item())
        divisor = _divisor(contract, n_visible, n_visible_global, _dist.group_size(token_group), given_count)

        if contract.reduction == "none":
            loss = per_token
        elif contract.reduction == "sum":
            loss = per_token.sum()
        else:
            loss = per_token.sum() / divisor if divisor > 0 else per_token.sum() * 0.0
        if contract.z_loss_positions == "all":  # a mean over every row of this rank, never over the divisor
            loss = loss + contract.z_loss * lse.square().sum() / max(n, 1)

        grad_hidden = grad_weight = token_weight = None
        if grad_output is not None:
            token_weight = upstream_per_token(grad_output, contract, visible, divisor, tp, y.device)
            z_weight = z_loss_per_row(grad_output, contract, token_weight)
            operands = backward_dtype or default_backward_dtype(weight)
            grad_h, grad_weight = _gradients(h, weight, y, lse, token_weight, z_weight, contract, token_chunk,
                                             vocab_chunk, operands)
            if contract.l2_warp:  # layout [N,V]: each row's argmax is on this rank
                l2_weight = l2_warp_per_row(grad_output, contract, n, divisor)
                _add_l2_warp(h, weight, contract, l2_weight, grad_h, grad_weight, token_chunk, vocab_chunk)
            _dist.all_reduce(grad_h, dist.ReduceOp.SUM, tp)  # each rank held its vocab slice's share
            grad_hidden = _local_rows(grad_h, contract, local_shape, tp).reshape(hidden.shape)

    local = slice(None) if not contract.sequence_parallel else _local_token_range(local_shape, tp)
    if contract.reduction == "none":
        loss = loss[local].reshape(local_shape)
    return ReferenceResult(
        loss=loss,
        per_token_loss=per_token[local],
        lse=lse[local],
        mean_logit=(logit_sum / contract.vocab_size)[local],
        mean_logit_local=(logit_sum_local / contract.vocab_slice_size)[local],
        targets=y[local],
        grad_hidden=grad_hidden,
        grad_weight=grad_weight,
        token_weight=None if token_weight is None else token_weight[local],
        n_tokens=n,
        n_visible=n_visible,
        n_visible_shard=int((targets != contract.ignore_index).sum()),
        n_visible_global=n_visible_global,
        divisor=float(divisor),
        tp_size=tp_size,
        token_group_size=_dist.group_size(token_group),
        nonfinite_inputs=nonfinite,
    )


def reduction_plan(contract: CEContract) -> dict[str, str]:
    """Where each reduction of the reference happens and over which group: the sentences a receipt states."""
    tp = _dist.group_size(contract.tp_group)
    over_tp = f"all-reduce {{}} over the TP group ({tp} ranks)" if tp > 1 else "local (TP=1, no collective)"
    tokens = _dist.group_size(contract.token_group)
    plan = {
        "layout": contract.layout,
        "sequence": (f"hidden [S/SP,B,D] all-gathered over the TP group ({tp} ranks) before the loss"
                     if contract.sequence_parallel else "tokens as given on this rank"),
        "target_masking": (f"targets outside [{contract.vocab_start}, {contract.vocab_end}) contribute 0 to the"
                           " gathered target logit; only the owning rank adds it" if tp > 1 else "whole vocabulary"),
        "running_max": "fp32 per vocab block, then " + over_tp.format("MAX"),
        "denominator": "fp32, rescaled to the global max, then " + over_tp.format("SUM"),
        "target_logit": "fp32, " + over_tp.format("SUM"),
        "grad_hidden": "fp32 per vocab slice, then " + over_tp.format("SUM"),
        "token_count": ("the count given with each step (transformers' num_items_in_batch); non-ignored tokens"
                        " counted on this rank for the report only" if contract.normalize_by == "given_count"
                        else f"non-ignored tokens all-reduced SUM over the token group ({tokens} ranks)"
                        if tokens > 1 else "non-ignored tokens on this rank"),
        "normalization": contract.describe_normalization(),
    }
    return plan


def _softmax_statistics(h, weight, y, contract, token_chunk, vocab_chunk):
    """Pass 1: per-token lse, target logit and logit sum over the *global* vocab, all fp32.

    Also returns this rank's own logit sum: a diagnosis needs it to test "smoothing used the local V".
    """
    n = h.shape[0]
    device = h.device
    run_max = torch.full((n,), -math.inf, dtype=torch.float32, device=device)
    denom = torch.zeros(n, dtype=torch.float32, device=device)
    target_logit = torch.zeros(n, dtype=torch.float32, device=device)
    logit_sum = torch.zeros(n, dtype=torch.float32, device=device)
    block_statistics = compiled_on_cuda(_block_statistics, device)
    for rows in _chunks(n, token_chunk):
        h_chunk = h[rows]                                                      # (T, D), input dtype
        local_target = y[rows] - contract.vocab_start                          # (T,) index into this slice
        running = run_max[rows], denom[rows], logit_sum[rows], target_logit[rows]
        for cols in _chunks(weight.shape[0], vocab_chunk):
            raw = exact_mm(h_chunk, weight[cols].T)                          # (T, Vb) fp32 h W^T: no multiplier, no cap
            running = block_statistics(raw, local_target - cols.start, *running, contract.logit_multiplier,
                                       contract.softcap)
        run_max[rows], denom[rows], logit_sum[rows], target_logit[rows] = running

    tp = contract.tp_group
    lse = group_lse(run_max, denom, tp)
    _dist.all_reduce(target_logit, dist.ReduceOp.SUM, tp)  # only the owning rank contributed a non-zero
    logit_sum_local = logit_sum.clone()
    _dist.all_reduce(logit_sum, dist.ReduceOp.SUM, tp)
    return lse, target_logit, logit_sum, logit_sum_local


def group_lse(row_max: torch.Tensor, denom: torch.Tensor, tp) -> torch.Tensor:
    """Each row's lse over the TP group's vocab slices, from this slice's max and sum of exp(z - max): the max
    over the group, then each rank's denominator rescaled to it and summed."""
    global_max = _dist.all_reduce(row_max.clone(), dist.ReduceOp.MAX, tp)
    total = _dist.all_reduce(denom * torch.exp(row_max - global_max), dist.ReduceOp.SUM, tp)
    return global_max + torch.log(total)


def _gradients(h, weight, y, lse, token_weight, z_weight, contract, token_chunk, vocab_chunk, operands):
    """Pass 2: dL/dh (this rank's vocab share) and dL/dW (this rank's slice), accumulated in fp32.

    Row t's logit gradient is ``p (w_t + 2 zw_t lse_t) - w_t eps / V - w_t (1 - eps) [v = y]``: ``w_t`` its
    weight in the reduction, ``zw_t`` its z-loss weight (``z_loss_per_row``); a row where both are 0 gets
    none. The logit multiplier m scales dL/dh and dL/dW once, at the end (``dL/draw = m dL/dz``).

    With fp16 operands every scale is a power of two, undone exactly: row t's logit gradient is scaled
    by ``2**e_t`` so its bound ``|w_t + 2 zw_t lse_t| + |w_t|`` sits at ``2**14``; W by one shared
    ``2**e_w``; and h_t, which meets the scaled gradient in dL/dW, by ``2**(e_h - e_t)``, so each token's
    dL/dW share keeps its size relative to the others.
    """
    eps = contract.label_smoothing
    grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
    prob_scale = token_weight + 2.0 * z_weight * lse                            # (N,)
    active = (token_weight != 0) | (z_weight != 0)                              # (N,) rows with any gradient
    token_exp = torch.zeros(h.shape[0], dtype=torch.int32, device=h.device)    # e_t
    weight_exp = hidden_exp = 0
    if operands == torch.float16 and h.shape[0]:
        token_exp = FP16_EXPONENT - ceil_log2(prob_scale.abs() + token_weight.abs())
        h_share = abs_max(h, dim=1) * pow2(-token_exp) * active
        weight_exp, hidden_exp = (FP16_EXPONENT - ceil_log2(torch.stack(
            [abs_max(weight), h_share.max()]))).tolist()                      # one host sync per call
    block_logit_grad = compiled_on_cuda(_block_logit_grad, h.device)
    for rows in _chunks(h.shape[0], token_chunk):
        h_chunk = h[rows]                                                      # (T, D), input dtype
        live = active[rows, None]                                              # no gradient: 0, never inf * 0
        h_operand = (h_chunk * (pow2(hidden_exp - token_exp[rows])[:, None] * live)).to(operands)
        local_target = y[rows] - contract.vocab_start
        token_scale = pow2(token_exp[rows])                                   # (T,)
        w_tok = token_weight[rows] * token_scale                               # (T,) upstream and 1/divisor; 0 if ignored
        p_scale, uniform, hit = prob_scale[rows] * token_scale, w_tok * (eps / contract.vocab_size), w_tok * (1 - eps)
        lse_rows, grad_h_rows = lse[rows], grad_h[rows]                        # views, once per token chunk
        for cols in _chunks(weight.shape[0], vocab_chunk):
            w_block = weight[cols]                                             # (Vb, D), input dtype
            raw = exact_mm(h_chunk, w_block.T)                                # (T, Vb) fp32 h W^T: no multiplier, no cap
            # The target's column in this block; a target elsewhere falls outside [0, width) and matches none.
            dz = block_logit_grad(raw, lse_rows, p_scale, uniform, hit, local_target - cols.start,
                                  contract.logit_multiplier, contract.softcap, operands)
            del raw
            w_operand = torch.mul(w_block, 2.0 ** weight_exp, out=torch.empty_like(w_block, dtype=operands))
            add_product(grad_h_rows, dz, w_operand)
            add_product(grad_w[cols], dz.T, h_operand, alpha=2.0 ** -hidden_exp)
        grad_h_rows *= pow2(-token_exp[rows] - weight_exp)[:, None]
    if contract.logit_multiplier != 1:  # dL/draw = m dL/dz: one fp32 rounding per element, after every sum
        grad_h *= contract.logit_multiplier
        grad_w *= contract.logit_multiplier
    return grad_h, grad_w


def _add_l2_warp(h, weight, contract, l2_weight, grad_h, grad_w, token_chunk, vocab_chunk) -> None:
    """The L2-warp penalty's gradient, added in place: row t's dL/dz at its argmax a_t is ``l2_weight * z_ta``
    (times the softcap's derivative there, and the multiplier for dL/draw), a rank-1 term per row:
    ``dL/dh_t += c_t W[a_t]`` and ``dL/dW[a_t] += c_t h_t``, fp32. One more logits pass finds each row's max.

    The max and argmax are read from the logits rounded to the input dtype, as the model holds them and fla's
    penalty reads them (the first index on a tie): in bf16 two top logits tie often enough (1 row in 48 at V=97)
    that an fp32 argmax would put that row's penalty on another class."""
    n = h.shape[0]
    row_max = torch.full((n,), -math.inf, dtype=torch.float32, device=h.device)
    argmax = torch.zeros(n, dtype=torch.long, device=h.device)
    for rows in _chunks(n, token_chunk):
        for cols in _chunks(weight.shape[0], vocab_chunk):
            z = _logits(exact_mm(h[rows], weight[cols].T), contract.logit_multiplier, contract.softcap)  # (T, Vb)
            z = z.to(h.dtype).float()                                            # as the model's logits round
            block_max, block_arg = z.max(dim=1)                                  # first index on a tie, as torch.max
            better = block_max > row_max[rows]
            row_max[rows] = torch.where(better, block_max, row_max[rows])
            argmax[rows] = torch.where(better, block_arg + cols.start, argmax[rows])
    coef = l2_weight * row_max                                                   # (N,) dL/dz at the argmax
    if contract.softcap is not None:
        coef = coef * (1.0 - (row_max / contract.softcap).square())             # d tanh-cap / d raw
    coef = coef * contract.logit_multiplier                                      # dL/draw = m dL/dz
    grad_h += coef[:, None] * weight[argmax].float()                             # (N, D)
    grad_w.index_add_(0, argmax, coef[:, None] * h.float())                     # (V, D)


def _block_statistics(raw, block_target, run_max, denom, logit_sum, target_logit, multiplier: float,
                      softcap: float | None):
    """One logits block folded into each row's running statistics: the max, the sum of exp(z - max)
    (rescaled to the new max), the sum of z, and the target's logit where the target (``block_target``, its
    column in this block) falls in the block; z is ``raw`` times the multiplier, softcapped. One function, so
    that on CUDA one compiled call does a block."""
    z = _logits(raw, multiplier, softcap)
    block_max = z.amax(dim=1)
    new_max = torch.maximum(run_max, block_max)
    block_denom = (z - block_max[:, None]).exp_().sum(dim=1)               # in place: one block-sized buffer
    denom = denom * torch.exp(run_max - new_max) + block_denom * torch.exp(block_max - new_max)
    in_block = (block_target >= 0) & (block_target < raw.shape[1])          # also drops ignore_index
    picked = z.gather(1, block_target.clamp(0, raw.shape[1] - 1)[:, None]).squeeze(1)
    return new_max, denom, logit_sum + z.sum(dim=1), target_logit + torch.where(in_block, picked, 0.0)


def _block_logit_grad(raw, lse, prob_scale, uniform, hit, target_col, multiplier: float, softcap: float | None,
                      dtype: torch.dtype) -> torch.Tensor:
    """dL/dz of one block, rounded once to ``dtype``: ``p_v prob_scale - uniform - hit [v = y]``, times the softcap's
    derivative; z is ``raw`` times the multiplier, whose own factor on dL/draw the caller applies.

    Per token: ``prob_scale = w + 2 zw lse``, ``uniform = w eps / V``, ``hit = w (1 - eps)``, where w is the
    token's weight (upstream gradient / divisor, 0 if ignored) and zw its z-loss weight, both times its fp16
    scale; ``target_col`` is the target's column in this block, outside ``[0, block width)`` if elsewhere. The
    target's term is subtracted in fp32, where ``p_y ~ 1`` cancels.
    """
    z = _logits(raw, multiplier, softcap)
    grad = (z - lse[:, None]).exp_().mul_(prob_scale[:, None]).sub_(uniform[:, None])  # one (T, Vb) buffer
    if torch.compiler.is_compiling():  # a column mask fuses into the one kernel that writes the block
        cols = torch.arange(raw.shape[1], device=raw.device)
        grad = torch.where(cols[None, :] == target_col[:, None], grad - hit[:, None], grad)
    else:  # eagerly, touch each row's target column only, not a (T, Vb) mask
        in_block = (target_col >= 0) & (target_col < raw.shape[1])
        rows = torch.arange(raw.shape[0], device=raw.device)
        grad[rows, target_col.clamp(0, raw.shape[1] - 1)] -= torch.where(in_block, hit, 0.0)
    if softcap is not None:
        grad = grad * (1.0 - (z / softcap).square())                            # d tanh-cap / d raw
    return grad.to(dtype)


def _local_token_range(local_shape: torch.Size, tp) -> slice:
    per_rank = math.prod(local_shape)
    start = _dist.group_rank(tp) * per_rank
    return slice(start, start + per_rank)


def _local_rows(grad_h: torch.Tensor, contract: CEContract, local_shape: torch.Size, tp) -> torch.Tensor:
    """Under SP the gradient covers the gathered sequence; keep this rank's shard."""
    return grad_h[_local_token_range(local_shape, tp)] if contract.sequence_parallel else grad_h


def count_nonfinite(t: torch.Tensor | None, block_elements: int = 1 << 24) -> int:
    """NaN/Inf count, a block of rows at a time: a mask of a [V, D] weight would cost V*D bytes at once."""
    if t is None:
        return 0
    t = t.detach()
    flat = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(-1, 1)
    count = torch.zeros((), dtype=torch.int64, device=t.device)
    for r in _chunks(flat.shape[0], max(1, block_elements // max(flat.shape[1], 1))):
        count += (~torch.isfinite(flat[r])).sum()
    return int(count)  # one wait for the device, not one per block


def _chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def _logits(raw: torch.Tensor, multiplier: float, cap: float | None) -> torch.Tensor:
    """The contract's logits from ``hidden @ weight.T``: times the multiplier, then softcapped."""
    z = raw if multiplier == 1 else raw * multiplier
    return z if cap is None else cap * torch.tanh(z / cap)
