"""Fit the fused path's hidden-gradient error onto the directions the seam faults move it along.

A norm says how much dL/dh is off, not which way. Each catalogued fault moves a token's dL/dh row along
a direction built from that token's softmax (``u_i`` is the token's weight in the reduction, ``t_i`` the
weight row of its target, ``m_i = sum_j p_ij w_j`` the softmax-mean weight row, ``w`` the mean weight row
over the global vocabulary):

- ``scale``: the reference row ``r_i`` itself (a divide missing, doubled, or by another count);
- ``target``: ``u_i t_i`` (the target term gathered wrong, or its common factor rounded);
- ``shift``: ``u_i w`` (one constant added to dL/dz over the vocabulary: label smoothing's uniform term
  over the wrong V);
- a wrong denominator (running sum-exp or max kept in a narrow dtype) moves it along ``u_i m_i``, which is
  ``r_i + (1 - eps) u_i t_i + eps u_i w``: equal coefficients on ``scale`` and ``target``.

A narrow dtype for the softmax's statistics (running max, sum-exp, lse) has no common direction: each token's
rounded lse scales that token's softmax by its own factor, ``e^-delta_i``, so the error lies along ``u_i m_i``
with a coefficient that changes from token to token. The fit measures how widely those per-token coefficients
spread in what it leaves over, against the native path's (``F.linear`` in the input dtype, softmax in fp32)
on the same tokens: ``softmax_spread`` near 1 is native rounding, well above it is a narrower softmax.

A scale has one more reading. A path that applies the token weight before rounding the logit gradient to
bf16 rounds every entry near the weight itself (a confident token's top class, or the target term of a
token whose target is unlikely) by that weight's own relative rounding, which moves with the token count.
On a trained model's peaked softmax those entries carry much of the gradient, so its fitted scale sits off
the loss's factor by up to one bf16 roundoff, though no fault but the scale is there. Given the loss's
factor ``kappa``, the native path runs at weights ``u (1 + kappa)``: a pure scale, rounded as such a path
rounds it. Its coefficients (``pure_*``) are what the fit reads for a scale and nothing else, and
its leftover spread along ``u_i m_i`` (which that rounding widens too) is then the one ``softmax_spread``
is measured against.

Rounding spreads its error over all D elements of every token; a fault puts its error on one direction
per token. Projected, a 0.2% scale reads at many standard errors while the error's norm is within its
bf16 budget. Standard errors are cluster-robust with tokens as clusters (rounding is independent across
tokens, not across one token's elements), from what the fit leaves over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ce_guard import _dist
from ce_guard._matmul import matmul
from ce_guard.contract import CEContract
from ce_guard._compile import compiled_on_cuda
from ce_guard.reference import _block_logit_grad, group_lse

DIRECTIONS = ("scale", "target", "shift")
_BLOCK_ELEMENTS = 1 << 25  # logits of one block of fitted tokens: 128 MiB of fp32


@dataclass(frozen=True)
class SignatureFit:
    """Coefficients of ``fused - reference`` dL/dh on each direction, their standard errors, and what is left.

    ``scale`` is in units of the reference gradient (``0.0021`` means dL/dh is ``1.0021x``); ``target`` and
    ``shift`` in units of the token's weight times the target row / the mean weight row. ``residual_rel``
    is ``|e - X beta| / |r|`` and ``error_rel`` is ``|e| / |r|`` over the fitted tokens.
    """

    tokens: int
    scale: float
    scale_se: float
    target: float
    target_se: float
    shift: float
    shift_se: float
    error_rel: float
    residual_rel: float
    softmax_spread: float  # mean square of the per-token u_i m_i coefficients left over, fused / native (pure)
    softmax_spread_se: float  # standard error of its logarithm
    softmax_excess: float  # rms per-token softmax factor beyond the native path's (0 when not wider)
    pure_scale: float | None = None  # the coefficients of a pure scale by the loss's factor, rounded natively
    pure_target: float | None = None
    pure_shift: float | None = None

    def spread_sigmas(self) -> float:
        """How many standard errors the per-token softmax coefficients spread wider than the native path's."""
        if not (self.softmax_spread > 0 and math.isfinite(self.softmax_spread)):
            return 0.0
        return math.log(self.softmax_spread) / self.softmax_spread_se if self.softmax_spread_se > 0 else math.inf

    def sigmas(self, direction: str) -> float:
        """How many standard errors the coefficient on ``direction`` lies from zero."""
        value, se = getattr(self, direction), getattr(self, f"{direction}_se")
        return abs(value) / se if se > 0 else (0.0 if value == 0 else math.inf)


def fit_signatures(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    grad_fused: torch.Tensor | None,
    grad_ref: torch.Tensor | None,
    token_weight: torch.Tensor | None,
    contract: CEContract,
    *,
    loss_factor: float | None = None,
    max_tokens: int = 2048,
) -> SignatureFit | None:
    """Fit ``grad_fused - grad_ref`` (rows aligned with ``hidden`` and ``targets``) onto the fault directions.

    Every rank of the TP group must call this together: the softmax's statistics, the softmax-mean rows and
    the target rows are summed over it. Returns ``None`` where the directions are not defined here: no
    gradient, softcapped logits, a z-loss over all positions (ignored rows' own gradient and a z weight that is
    not the token's fall outside the directions), the sequence-parallel layout, fewer visible tokens than
    directions, or non-finite values (checked after the collectives, so every rank of the group takes part in
    them). A logit multiplier m is honoured: the directions are built from the effective weight ``m W`` (its
    target and mean rows), and the native path scales its logits and their gradient by m in the input dtype, as
    transformers' models do.

    Args:
        hidden: ``[..., D]`` inputs of the output layer (the tokens whose dL/dh rows are given).
        weight: ``[V_local, D]`` this rank's vocab slice.
        targets: ids of hidden's leading shape.
        grad_fused: dL/dh as the fused path produced it, hidden's shape.
        grad_ref: dL/dh from the reference on the same tokens.
        token_weight: each token's weight in the reduction (the reference's dLoss/dper-token loss), flat.
        contract: the contract both were held to.
        loss_factor: the fused loss's ratio to the reference's, minus 1: the native path then runs scaled by
            it, and its coefficients are a pure scale's (``pure_*``; see the module docstring).
        max_tokens: visible tokens fitted at most, evenly spaced (the native path's two matmuls run on them).
    """
    if grad_fused is None or grad_ref is None or token_weight is None:
        return None
    if contract.softcap is not None or contract.sequence_parallel or contract.z_loss_positions == "all":
        return None
    d = hidden.shape[-1]
    y = targets.reshape(-1).long()
    rows = (y != contract.ignore_index).nonzero().squeeze(1)
    if rows.numel() <= len(DIRECTIONS):
        return None
    rows = rows[torch.linspace(0, rows.numel() - 1, min(max_tokens, rows.numel()), device=rows.device).long()]
    h, y = hidden.reshape(-1, d)[rows].detach(), y[rows]
    f = grad_fused.detach().reshape(-1, d)[rows].double()  # (m, D)
    r = grad_ref.detach().reshape(-1, d)[rows].double()    # (m, D)
    u = token_weight.detach().reshape(-1)[rows].double()  # (m,) each token's weight in the reduction
    eps, wbar = contract.label_smoothing, contract.logit_multiplier * _global_mean_row(weight, contract)  # (D,) of m W
    scaled = loss_factor is not None and math.isfinite(loss_factor) and loss_factor > -1  # a zero loss scales nothing
    factor = 1.0 + loss_factor if scaled else 1.0
    # The native path at token weights u * factor: with the loss's factor, a pure scale by it.
    native, target_row, lse = _native_grad(h, weight.detach(), y, factor * u, contract)
    native = native.to(grad_fused.dtype).double()  # (m, D) the output's rounding
    # The softmax-mean row m_i, to the native path's rounding: its dL/dh is
    # u_i ((1 + 2 z lse_i) m_i - (1 - eps) t_i - eps w), times the factor.
    softmax_part = native / factor + u[:, None] * ((1 - eps) * target_row + eps * wbar)
    mean_row = softmax_part / (1 + 2 * contract.z_loss * lse)[:, None]  # u_i m_i, (m, D)
    x = torch.stack([r, u[:, None] * target_row, u[:, None] * wbar.expand_as(r)])  # (3, m, D)
    if not (torch.isfinite(x).all() and torch.isfinite(f).all() and torch.isfinite(native).all()):
        return None  # non-finite values are the diagnosis then, and no least squares survives them
    return _cluster_fit(x, f - r, r, native - r, mean_row, scaled=scaled)


def _native_grad(h, weight, y, u, contract: CEContract):
    """Per fitted token, over the global V: the native path's dL/dh at token weights ``u``, the target's row of
    the effective weight ``m W`` and the lse.

    The native path's own arithmetic (``F.linear`` in the input dtype, ``F.cross_entropy`` in fp32): logits
    rounded to the input dtype (then times the multiplier m, rounded again), softmax in fp32, the logit gradient
    (token weight included) rounded to the input dtype, times m, before its matmul; 16-bit products on CPU as
    ``ce_guard._matmul.matmul`` computes them (that GEMM's arithmetic at fp32 speed). Each TP rank's share is
    summed in fp64.
    """
    m, d = h.shape
    tp, eps, multiplier = contract.tp_group, contract.label_smoothing, contract.logit_multiplier
    width = weight.shape[0]
    local = y - contract.vocab_start  # the target's column here; outside [0, width) if another rank's
    native = torch.empty(m, d, dtype=torch.float64, device=h.device)
    lse = torch.empty(m, dtype=torch.float64, device=h.device)
    block_statistics = compiled_on_cuda(_native_block_statistics, h.device)
    block_logit_grad = compiled_on_cuda(_native_block_logit_grad, h.device)
    step = max(1, _BLOCK_ELEMENTS // max(width, 1))
    for start in range(0, m, step):
        block = slice(start, start + step)
        z = matmul(h[block], weight.T)                                      # (c, V/TP), input dtype
        if multiplier != 1:
            z = z * multiplier                                              # rounded to the input dtype again
        block_lse = group_lse(*block_statistics(z), tp)                    # (c,) over the global vocab
        # u dL/dz of the contract: u ((1 + 2 z lse) p - (1 - eps) onehot - eps / V)
        weight_u = u[block].float()
        prob_scale = weight_u * (1 + 2 * contract.z_loss * block_lse)
        uniform, hit = weight_u * (eps / contract.vocab_size), weight_u * (1 - eps)
        logit_grad = block_logit_grad(z, block_lse, prob_scale, uniform, hit, local[block])
        if multiplier != 1:
            logit_grad = logit_grad * multiplier                            # dL/draw, in the input dtype
        native[block] = matmul(logit_grad, weight).double()                # this slice's share
        lse[block] = block_lse.double()
    owned = ((local >= 0) & (local < width))[:, None]
    target_row = torch.where(owned, weight[local.clamp(0, width - 1)].double() * multiplier, 0.0)
    shares = _dist.all_reduce(torch.stack([native, target_row]), dist.ReduceOp.SUM, tp)  # (2, m, D)
    return shares[0], shares[1], lse


def _native_block_statistics(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max and sum of exp(z - max) of one block of logits in the input dtype, upcast to fp32 as
    ``F.cross_entropy`` does; one function, so that on CUDA one compiled call reads the block once."""
    z = z.to(torch.float32, copy=True)  # a copy even of fp32 logits: the exp overwrites it
    z_max = z.amax(dim=1)
    return z_max, z.sub_(z_max[:, None]).exp_().sum(dim=1)


def _native_block_logit_grad(z, lse, prob_scale, uniform, hit, target_col) -> torch.Tensor:
    """The reference's logit gradient of one block of logits in the input dtype, rounded back to it."""
    return _block_logit_grad(z.float(), lse, prob_scale, uniform, hit, target_col, 1.0, None, z.dtype)


def _global_mean_row(weight: torch.Tensor, contract: CEContract) -> torch.Tensor:
    # Accumulated in fp32 as it is read: a float64 copy of the weight first would be 5 GB at V = 152k and
    # D = 4096, and a direction needs no more than fp32's precision.
    local = weight.detach().sum(dim=0, dtype=torch.float32).double()
    total = _dist.all_reduce(local, dist.ReduceOp.SUM, contract.tp_group)  # (D,)
    return total / contract.vocab_size


def _cluster_fit(x: torch.Tensor, error: torch.Tensor, ref: torch.Tensor, native_error: torch.Tensor,
                 softmax_row: torch.Tensor, *, scaled: bool = False) -> SignatureFit:
    """Least squares of ``error`` (m, D) on ``x`` (k, m, D) with tokens as clusters, and the spread of what is
    left along each token's ``softmax_row`` (m, D) against what the native path's ``native_error`` leaves;
    when that path ran at the loss's factor (``scaled``), its coefficients are a pure scale's (``pure_*``).

    Columns are scaled to unit norm before solving (the mean weight row is ~1/sqrt(V) of a target row);
    the sandwich covariance ``A^-1 (sum_i s_i s_i^T) A^-1`` uses each token's score ``s_i = x_i^T res_i``.
    Directions come first, so that every product over all elements is one matmul of a flat (k, m D) matrix.
    """
    k, m, _ = x.shape
    norms = x.square().sum(dim=(1, 2)).sqrt().clamp_min(1e-300)  # (k,)
    xs = x / norms[:, None, None]
    flat = xs.reshape(k, -1)                                         # (k, m D)
    a_inv = torch.linalg.pinv(flat @ flat.T)                         # (k, k)

    def leave_over(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta = a_inv @ (flat @ e.reshape(-1))                        # (k,)
        return beta, e - (beta @ flat).reshape(e.shape)              # (m, D)

    beta, residual = leave_over(error)
    scores = (xs * residual).sum(dim=2).T                            # (m, k)
    cov = a_inv @ (scores.T @ scores) @ a_inv * (m / max(m - k, 1))
    values = {name: (float(beta[i] / norms[i]), float(cov[i, i].clamp_min(0).sqrt() / norms[i]))
              for i, name in enumerate(DIRECTIONS)}
    # A scale multiplies a path's rounding with its gradient: compare the rounding at unit scale (against a pure
    # scale's when the native path ran at the loss's factor: its rounding differs from token to token too).
    def at_unit_scale(res: torch.Tensor, scale: float) -> torch.Tensor:
        return res / (1 + scale) if 1 + scale > 0 else res

    native_beta, native_residual = leave_over(native_error)
    native_values = [float(native_beta[i] / norms[i]) for i in range(len(DIRECTIONS))]
    pure = {f"pure_{name}": value for name, value in zip(DIRECTIONS, native_values, strict=True)} if scaled else {}
    spread, spread_se, excess = _spread_ratio(at_unit_scale(residual, values["scale"][0]),
                                              at_unit_scale(native_residual, native_values[0]), softmax_row)
    ref_norm = float(ref.norm())
    rel = (lambda t: float(t.norm()) / ref_norm) if ref_norm > 0 else (lambda t: math.inf)
    return SignatureFit(tokens=m, scale=values["scale"][0], scale_se=values["scale"][1],
                        target=values["target"][0], target_se=values["target"][1],
                        shift=values["shift"][0], shift_se=values["shift"][1],
                        error_rel=rel(error), residual_rel=rel(residual),
                        softmax_spread=spread, softmax_spread_se=spread_se, softmax_excess=excess, **pure)


def _spread_ratio(residual: torch.Tensor, native_residual: torch.Tensor,
                  row: torch.Tensor) -> tuple[float, float, float]:
    """Mean square of each token's coefficient along its own ``row``, fused over native; the delta-method
    standard error of the ratio's logarithm (tokens independent; ignoring the two samples' positive
    correlation only widens it); and the rms coefficient the fused path has beyond the native's."""
    row_sq = row.square().sum(1).clamp_min(1e-300)                  # (m,)
    squares = [((res * row).sum(1) / row_sq).square() for res in (residual, native_residual)]  # 2 x (m,)
    means = [float(sq.mean()) for sq in squares]
    if not all(mean > 0 and math.isfinite(mean) for mean in means):
        return math.nan, math.inf, 0.0
    m = row.shape[0]
    var_log = sum(float(sq.var(unbiased=False)) / (m * mean ** 2) for sq, mean in zip(squares, means))
    return means[0] / means[1], math.sqrt(var_log), math.sqrt(max(means[0] - means[1], 0.0))
