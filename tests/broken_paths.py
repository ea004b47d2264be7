"""A plain vocab-parallel CE (Megatron's recipe, autograd for gradients) with the seam faults as switches.

Tests use it as "some user's fused path": independent of ce_guard's reference and fused layer, so a
diagnosis test exercises the guard, not a shared formula. Its switches are the ``broken_path`` rows of
``ce_guard.testing.injections.INJECTIONS``. Its 16-bit products are ``ce_guard._matmul.matmul``'s: the input
dtype's GEMM (on CPU, fp32 products of the same values rounded once, at fp32 speed); tests of PyTorch's own GEMM
call ``F.linear`` themselves.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from ce_guard import _dist
from ce_guard._matmul import matmul
from ce_guard.contract import CEContract
from ce_guard.input_checksums import InputChecksums
from ce_guard.parity import SeamOutputs
from ce_guard.testing.injections import switches

FAULTS = switches(broken_path=True)


class _ReplicatedSum(torch.autograd.Function):
    """All-reduce SUM whose result feeds a loss every rank computes identically: backward is the identity.

    (torch.distributed.nn's all_reduce sums the gradients too, which would count that one loss TP times.)
    """

    @staticmethod
    def forward(ctx, t, group):
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _tp_sum(t: torch.Tensor, group) -> torch.Tensor:
    return _ReplicatedSum.apply(t, group) if _dist.group_size(group) > 1 else t


def _tp_max(t: torch.Tensor, group) -> torch.Tensor:
    if _dist.group_size(group) == 1:
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


class _BackwardOnly(torch.autograd.Function):
    """Identity forward; backward applies ``edit`` to the gradient: a fault the loss cannot show."""

    @staticmethod
    def forward(ctx, z, edit):
        ctx.edit = edit
        return z.view_as(z)

    @staticmethod
    def backward(ctx, g):
        return ctx.edit(g), None


def broken_fused(hidden, weight, targets, contract: CEContract, fault: str | None = None, *, scale: int = 2,
                 chunks: int = 8, grad_output: torch.Tensor | float | None = None,
                 handed: dict[str, InputChecksums] | None = None) -> SeamOutputs:
    """Run the vocab-parallel CE with ``fault`` (one of ``FAULTS``) and return loss and autograd gradients.

    ``grad_output``: the upstream gradient of the loss (per token under ``reduction='none'``; a number otherwise).
    ``handed``, when given, receives under ``"logits"`` the checksums of the logits this path hands its loss,
    before the loss and after backward (what a caller that computed the logits itself would measure).
    """
    if fault is not None and fault not in FAULTS:
        raise ValueError(f"broken_fused: `fault` must be None or one of {FAULTS}, got {fault!r}.")
    tp = contract.tp_group
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    hh, yy = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if contract.sequence_parallel:
        hh = torch.cat(dist_fn.all_gather(h, group=tp), dim=0).reshape(-1, h.shape[-1])
        yy = _dist.all_gather_dim0(targets, tp).reshape(-1)
    acc = torch.bfloat16 if fault == "bf16_accumulators" else torch.float32
    if fault == "bf16_accumulators":  # logits and all running sums in bf16, dW summed chunk by chunk in bf16
        z = _bf16_chunked_logits(hh, w, chunks)
    elif fault == "bf16_grad_hidden_sum":  # dL/dh summed over vocab blocks in bf16 (Cut CE 25.1.1's dL/de)
        z = _Bf16HiddenSumLinear.apply(hh, w, chunks)
    else:
        z = matmul(hh, w.T).float()                                               # (N, V/TP)
    logits = z
    before = InputChecksums.of(logits=logits) if handed is not None else None
    if fault == "overwrites_logits":  # dL/dz written into the logits' storage (TE's parallel_cross_entropy to 2.17)
        z = _BackwardOnly.apply(z, lambda g: (logits.data.copy_(g.to(logits.dtype)), g)[1])
    if fault == "coarse_backward":
        threshold = 2e-2 / max(z.shape[0], 1)  # drops entries under it (Cut CE's filter, exaggerated)
        z = _BackwardOnly.apply(z, lambda g: torch.where(g.abs() < threshold, torch.zeros_like(g), g))
    if fault == "backward_scale":
        z = _BackwardOnly.apply(z, lambda g: g / max(z.shape[0], 1))  # a mean the forward did not take
    if contract.softcap is not None:
        z = contract.softcap * torch.tanh(z / contract.softcap)
    z = z.to(acc)
    local_max = z.detach().amax(dim=1)
    gmax = _tp_max(local_max, tp)
    if fault == "bf16_accumulators":  # running denominator over vocab blocks, rounded to bf16 at each step
        running = torch.zeros(z.shape[0], dtype=torch.bfloat16)
        for block in torch.arange(z.shape[1]).chunk(chunks):
            running = running + torch.exp(z[:, block] - gmax[:, None].to(acc)).sum(dim=1).to(acc)
        sum_exp = _tp_sum(running.float(), tp)
    else:
        sum_exp = _tp_sum(torch.exp(z - gmax[:, None]).sum(dim=1).float(), tp)
    if fault == "gathered_logits_log_tp":
        sum_exp = _tp_sum(sum_exp, tp)                                            # summed over TP twice
    lse = gmax.float() + torch.log(sum_exp)

    visible = yy != contract.ignore_index
    local_t = yy - contract.vocab_start
    if fault == "unmasked_partition_targets":
        owned = visible
        local_t = local_t.clamp(0, z.shape[1] - 1)
    elif fault == "partition_off_by_one":
        owned = visible & (local_t >= 0) & (local_t <= z.shape[1])
        local_t = local_t.clamp(0, z.shape[1] - 1)
    elif fault == "ignored_as_class_zero":
        owned = (local_t >= 0) & (local_t < z.shape[1]) | ~visible
        local_t = torch.where(visible, local_t, -contract.vocab_start).clamp(0, z.shape[1] - 1)
    else:
        owned = visible & (local_t >= 0) & (local_t < z.shape[1])
        local_t = local_t.clamp(0, z.shape[1] - 1)
    target_logit = _tp_sum(torch.where(owned, z.gather(1, local_t[:, None]).squeeze(1).float(), 0.0), tp)
    eps = contract.label_smoothing
    if fault == "smoothing_local_vocab":
        smooth = lse - z.float().mean(dim=1)                                    # local V, local mean
    else:
        smooth = lse - _tp_sum(z.float().sum(dim=1), tp) / contract.vocab_size
    per_token = (1 - eps) * (lse - target_logit) + eps * smooth
    # The z-loss per counted token (inside the mean), or over every row as one mean apart (transformers' Bamba).
    z_over_all = (contract.z_loss_positions == "all") != (fault in ("z_loss_over_all_rows", "z_loss_over_counted_tokens"))
    if fault != "missing_z_loss" and not z_over_all:
        per_token = per_token + contract.z_loss * lse.square()
    keep = visible | (fault == "ignored_as_class_zero")
    per_token = torch.where(keep, per_token, 0.0)

    n_vis = int(visible.sum())
    count = n_vis if fault != "ignore_in_denominator" else yy.numel()
    if fault == "shard_normalization":  # SP lane dividing by its own S/SP shard's tokens
        count = int((targets != contract.ignore_index).sum())
    if contract.reduction == "mean" and contract.normalize_by == "global_tokens" and fault != "local_normalization":
        total = torch.tensor([float(count)])
        _dist.all_reduce(total, dist.ReduceOp.SUM, contract.token_group)
        count = float(total) / (_dist.group_size(contract.token_group) if contract.grad_sync == "average" else 1)
    if contract.reduction == "none":
        loss = per_token.reshape(targets.shape) if not contract.sequence_parallel else per_token
    elif contract.reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / max(count, 1)
    if z_over_all and contract.reduction != "none":
        loss = loss + contract.z_loss * lse.square().mean()
    if contract.l2_warp:
        other_rows = fault in ("l2_warp_over_counted", "l2_warp_over_all_rows")  # the set the contract does not say
        divisor = count if contract.reduction == "mean" else 1
        rows = yy.numel() if (contract.l2_warp_rows == "all") != other_rows else divisor
        loss = loss + _l2_warp(z, contract.l2_warp, rows, 1.0 if fault != "l2_warp_upstream_ignored" else grad_output)
    if fault == "grad_scale":
        loss = loss * scale
    if fault == "nan":
        loss = loss + torch.tensor(math.nan)
    if contract.reduction == "none":
        loss.backward(_applied_upstream(grad_output if grad_output is not None else torch.ones_like(loss), fault))
    else:
        loss.backward(torch.tensor(1.0 if grad_output is None else float(grad_output)))
    grad_h = h.grad
    if handed is not None:
        handed["logits"] = before.measured_after(logits=logits)
    if fault == "overwrites_hidden":  # the gradient written back into the caller's hidden states
        with torch.no_grad():
            hidden.copy_(grad_h.to(hidden.dtype).reshape(hidden.shape))
    if not contract.sequence_parallel and fault != "partial_grad_hidden":
        # hidden is replicated over TP: sum each slice's share (copy-to-TP backward); the fault does it twice
        for _ in range(2 if fault == "doubled_grad_hidden" else 1):
            grad_h = grad_h.clone()
            _dist.all_reduce(grad_h, dist.ReduceOp.SUM, tp)
    return SeamOutputs(loss=loss.detach(), grad_hidden=grad_h, grad_weight=w.grad)


def _l2_warp(z: torch.Tensor, factor: float, rows: float, upstream: float | None) -> torch.Tensor:
    """fla's L2-warp: 0 in value, its gradient that of ``(factor / 2) * sum_t max_v z_tv**2 / rows`` (each row's
    argmax, ignored rows included). Divided by ``upstream``, the gradient comes out unscaled by it, as fla's
    ``l2_warp`` backward to 0.5.1 returns it."""
    top = z.max(dim=1).values.square().sum() * (factor / 2 / max(rows, 1) / float(upstream or 1.0))
    return top - top.detach()


def _bf16_chunked_logits(h: torch.Tensor, w: torch.Tensor, chunks: int) -> torch.Tensor:
    """bf16 logits whose weight gradient is accumulated chunk by chunk in bf16 (Liger's default)."""
    return _Bf16ChunkedLinear.apply(h, w, chunks)


class _Bf16ChunkedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, chunks):
        ctx.save_for_backward(h, w)
        ctx.chunks = chunks
        return matmul(h.bfloat16(), w.bfloat16().T).float()

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        g16 = g.bfloat16()
        grad_h = matmul(g16, w.bfloat16()).to(h.dtype)
        grad_w = torch.zeros(w.shape, dtype=torch.bfloat16)
        for rows in torch.arange(h.shape[0]).chunk(ctx.chunks):
            grad_w += matmul(g16[rows].T, h[rows].bfloat16())  # each chunk's product rounded, then added in bf16
        return grad_h, grad_w.to(w.dtype), None


class _Bf16HiddenSumLinear(torch.autograd.Function):
    """fp32 logits; in backward dL/dh is a running sum over ``blocks`` vocab blocks rounded to bf16 after each."""

    @staticmethod
    def forward(ctx, h, w, blocks):
        ctx.save_for_backward(h, w)
        ctx.blocks = blocks
        return h.float() @ w.float().T                                          # (N, V/TP)

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        running = torch.zeros(h.shape, dtype=torch.bfloat16)                    # (N, D)
        for cols in torch.arange(w.shape[0]).chunk(ctx.blocks):
            running = (running.float() + g[:, cols] @ w[cols].float()).bfloat16()
        return running.to(h.dtype), (g.T @ h.float()).to(w.dtype), None


def _applied_upstream(grad_output: torch.Tensor, fault: str | None) -> torch.Tensor:
    """The per-token upstream gradient the backward applies (``reduction='none'``): the given one, or a fault's."""
    if fault == "upstream_first_token":  # Liger-Kernel <= 0.8.1: tl.load(grad_output_ptr), element 0, for every row
        return torch.full_like(grad_output, float(grad_output.reshape(-1)[0]))
    if fault == "upstream_permuted":  # each token gets another token's weight (a fixed shuffle)
        order = torch.randperm(grad_output.numel(), generator=torch.Generator().manual_seed(0))
        return grad_output.reshape(-1)[order].reshape(grad_output.shape)
    if fault == "upstream_transposed":  # Transformer Engine 2.8-2.10: the [S,B] view of a [B,S] buffer read as [S,B]
        if grad_output.dim() != 2:
            raise ValueError("upstream_transposed needs a 2-D [S,B] per-token loss, got shape"
                             f" {tuple(grad_output.shape)}.")
        return grad_output.mT.reshape(grad_output.shape)  # row-major order of the [B,S] transpose, read as [S,B]
    return grad_output
