"""The error budget a check is judged by, earned by the native path on the same inputs.

A fixed tolerance either cries wolf on bf16 or waves through an fp32 bug. The budget here is what a
plain ``F.linear`` in the input dtype followed by an fp32 cross-entropy gets wrong *on the same inputs*
(measured on a token sample), times a safety factor: bf16 runs are judged by bf16 rounding, fp32 runs
strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ce_guard._matmul import matmul
from ce_guard.contract import CEContract

# Relative-error floors per input dtype, (loss, gradients): reduction order alone moves results this much.
# A mean loss averages rounding over tokens, so its floor sits ten times under the gradients'.
_FLOORS = {torch.float64: (1e-11, 1e-10), torch.float32: (2e-6, 2e-5), torch.bfloat16: (2e-4, 2e-3),
           torch.float16: (5e-5, 5e-4)}


# Unit roundoff of what fp32 matmuls round to under torch.set_float32_matmul_precision: TF32, bf16.
_FP32_MATMUL_ROUNDOFF = {"highest": 0.0, "high": 2.0 ** -11, "medium": 2.0 ** -8}


def _grad_scale(dtype: torch.dtype) -> float:
    """The largest common scale rounding alone can put on a gradient computed from ``dtype`` inputs.

    Rounding every element the same way by up to half an ulp scales the whole gradient by up to the unit
    roundoff of the matmuls' precision (bf16: 2^-8 = 0.39%). It happens when one rounded factor dominates,
    e.g. the target term -1/n of dL/dz: correct bf16 paths show 0.2-0.3% on CPU. Never below the dtype's
    gradient floor.
    """
    roundoff = torch.finfo(dtype).eps / 2
    if dtype == torch.float32:
        roundoff = max(roundoff, _FP32_MATMUL_ROUNDOFF.get(torch.get_float32_matmul_precision(), 0.0))
    return max(roundoff, _FLOORS.get(dtype, _FLOORS[torch.float32])[1])


@dataclass(frozen=True)
class ErrorBudget:
    """Largest errors a correct path may show, relative to the reference (``per_token_abs`` absolute).

    ``grad_scale`` bounds the gradients' common scale alone (norm ratio - 1): rounding biases it by at most
    one unit roundoff of the input dtype, less than the per-element budget allows.
    """

    loss_rel: float
    grad_hidden_rel: float
    grad_weight_rel: float
    per_token_abs: float
    grad_scale: float
    source: str

    @classmethod
    def for_dtype(cls, dtype: torch.dtype, *, safety: float = 4.0) -> "ErrorBudget":
        """A budget from the dtype's floor alone, for when the native path cannot be run."""
        loss_floor, grad_floor = _FLOORS.get(dtype, _FLOORS[torch.float32])
        return cls(loss_rel=safety * loss_floor, grad_hidden_rel=safety * grad_floor,
                   grad_weight_rel=safety * grad_floor, per_token_abs=safety * grad_floor,
                   grad_scale=_grad_scale(dtype),
                   source=f"{safety:g} x the {dtype} floors ({loss_floor:g} loss, {grad_floor:g} gradients)")


def native_error_budget(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    contract: CEContract,
    *,
    sample_tokens: int = 128,
    safety: float = 4.0,
    given_count: float | torch.Tensor | None = None,
) -> ErrorBudget:
    """Measure the native path's error on a token sample and turn it into a budget.

    The native path is PyTorch's own: ``F.linear`` in the input dtype (times the contract's logit multiplier,
    rounded again, as transformers' models scale their logits), then ``F.cross_entropy`` in fp32, autograd for
    the gradients (which come back in the input dtype); 16-bit products on CPU as ``ce_guard._matmul.matmul``
    computes them (that GEMM's arithmetic at fp32 speed). It is judged against the same math in float64 on this
    rank's vocab slice; the rounding it shows is the rounding a fused path may show. Each budget entry is
    ``safety * native_error + floor(dtype)``, with a lower floor for the loss.

    Under ``z_loss_positions='all'`` or an L2-warp the sample is drawn from every row, ignored ones included (they
    carry the penalty's gradient), each weighted as in the loss: cross-entropy by 1/divisor (``given_count`` under
    ``normalize_by='given_count'``, else this rank's non-ignored tokens), z-loss by 1/rows, L2-warp by 1/rows or
    1/divisor per ``l2_warp_rows``.
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1) - contract.vocab_start
    visible = targets.reshape(-1) != contract.ignore_index
    z_over_rows = contract.z_loss_positions == "all" and contract.z_loss > 0
    every_row = z_over_rows or contract.l2_warp > 0  # layout [N,V]: every target inside
    inside = visible & (y >= 0) & (y < contract.vocab_slice_size)
    rows = (inside | every_row).nonzero().squeeze(1)
    loss_floor, grad_floor = _FLOORS.get(hidden.dtype, _FLOORS[torch.float32])
    if rows.numel() == 0:
        return ErrorBudget.for_dtype(hidden.dtype, safety=safety)
    rows = rows[torch.linspace(0, rows.numel() - 1, min(sample_tokens, rows.numel())).long()]
    h_s, y_s, visible_s = h[rows].detach(), y[rows].clamp(min=0), visible[rows]
    n_visible = int(visible.sum())
    # Each sampled row's share of the loss, up to one common factor: CE by 1/divisor, the z-loss and the L2-warp
    # by 1/rows or 1/divisor as the contract says, when a term reaches every row; else one token's loss. Their
    # mean over the averaged rows is the loss.
    ce_weight = (h.shape[0] / (float(given_count) if given_count is not None else max(n_visible, 1))
                 if every_row else 1.0)
    l2_warp_weight = ce_weight if contract.l2_warp_rows == "counted" else 1.0
    penalized = {}  # each row's argmax as the native run's logits hold it, for both runs (a tie breaks one way)

    def run(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        h_in = h_s.to(dtype).detach().requires_grad_()
        w_in = weight.detach().to(dtype).requires_grad_()
        z = matmul(h_in, w_in.T)  # F.linear's product (16-bit on CPU: ce_guard._matmul), autograd through it
        # The output transforms in the input dtype, as a model applies them to its logits (transformers' Gemma 2
        # softcaps bf16 logits: three more roundings than an fp32 softcap, 2 of 20 clean bf16 checks over budget).
        if contract.logit_multiplier != 1:
            z = z * contract.logit_multiplier
        if contract.softcap is not None:
            z = contract.softcap * torch.tanh(z / contract.softcap)
        z = z.float() if dtype != torch.float64 else z
        per_token = F.cross_entropy(z, y_s, reduction="none", label_smoothing=contract.label_smoothing)
        z_loss = contract.z_loss * torch.logsumexp(z, dim=1).square()
        per_token = torch.where(visible_s, (per_token + (0 if z_over_rows else z_loss)) * ce_weight, 0.0)
        per_token = per_token + (z_loss if z_over_rows else 0)
        if contract.l2_warp:  # fla's penalty: nothing in value, its gradient at each row's argmax
            top_index = penalized.setdefault("argmax", z.detach().argmax(dim=1, keepdim=True))
            top = z.gather(1, top_index).squeeze(1).square() * (contract.l2_warp / 2 * l2_warp_weight)
            per_token = per_token + (top - top.detach())
        per_token.mean().backward()
        return per_token.detach().double(), h_in.grad.double(), w_in.grad.double()

    native, exact = run(hidden.dtype), run(torch.float64)
    loss_rel = _expected_mean_error(native[0] - exact[0], n_averaged=h.shape[0] if every_row else n_visible)
    loss_rel /= max(abs(float(exact[0].mean())), 1e-12)
    grad_hidden_rel = _rel(native[1], exact[1])
    # The sample leaves most rows of a large vocab's dW without a target (128 tokens, 262k rows), and there
    # the native rounding nearly vanishes: its dW error falls with V while a full batch's does not (the
    # bf16 margin rose from 0.36 to 0.79 between V = 32k and 262k, docs/benchmarks.md "Calibration").
    # dL/dh is dense at any V and comes from the same rounded logit gradient, so it bounds dW's from below.
    grad_weight_rel = max(_rel(native[2], exact[2]), grad_hidden_rel)
    return ErrorBudget(
        loss_rel=safety * loss_rel + loss_floor,
        grad_hidden_rel=safety * grad_hidden_rel + grad_floor,
        grad_weight_rel=safety * grad_weight_rel + grad_floor,
        per_token_abs=safety * float((native[0] - exact[0]).abs().max()) + grad_floor,
        grad_scale=_grad_scale(hidden.dtype),
        source=f"{safety:g} x native {hidden.dtype} path on {rows.numel()} tokens + floors"
               f" ({loss_floor:g} loss, {grad_floor:g} gradients)",
    )


def _expected_mean_error(token_error: torch.Tensor, *, n_averaged: int) -> float:
    """The error a correct path's mean over ``n_averaged`` tokens is expected to show, from a sample of its
    per-token errors: their spread over the averaged count, plus any bias the sample shows beyond its noise.

    Rounding to nearest is unbiased, so a correct path's per-token errors mostly cancel in the mean. The
    sample's own mean is not the estimate: on 256 tokens its noise (spread / 16) is what varies a budget
    25x from check to check while the full batch's mean error is spread / sqrt(n). Only the part of it
    beyond three standard errors is kept as a bias the fused path may share.
    """
    m = token_error.numel()
    spread = float(token_error.std(unbiased=False))
    bias = max(abs(float(token_error.mean())) - 3 * spread / math.sqrt(m), 0.0)
    return math.sqrt(bias ** 2 + spread ** 2 / max(n_averaged, 1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(b.norm())
    return float((a - b).norm()) / denom if denom > 0 else 0.0
