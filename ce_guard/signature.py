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
from ce_guard.contract import CEContract

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
    contract: CEContract,
    *,
    max_tokens: int = 2048,
) -> SignatureFit | None:
    """Fit ``grad_fused - grad_ref`` (rows aligned with ``hidden`` and ``targets``) onto the fault directions.

    Every rank of the TP group must call this together: the softmax's statistics, the softmax-mean rows and
    the target rows are summed over it. Returns ``None`` where the directions are not defined here: no
    gradient, softcapped logits, the sequence-parallel layout, fewer visible tokens than directions, or
    non-finite values (checked after the collectives, so every rank of the group takes part in them).

    Args:
        hidden: ``[..., D]`` inputs of the output layer (the tokens whose dL/dh rows are given).
        weight: ``[V_local, D]`` this rank's vocab slice.
        targets: ids of hidden's leading shape.
        grad_fused: dL/dh as the fused path produced it, hidden's shape.
        grad_ref: dL/dh from the reference on the same tokens.
        contract: the contract both were held to.
        max_tokens: visible tokens fitted at most, evenly spaced (the directions cost two matmuls on them).
    """
    if grad_fused is None or grad_ref is None or contract.softcap is not None or contract.sequence_parallel:
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
    mean_row, target_row, lse = _softmax_directions(h, weight.detach(), y, contract)

    eps, wbar = contract.label_smoothing, _global_mean_row(weight, contract)  # wbar: (D,)
    # dL/dh of one token per unit of its weight: the contract's softmax (with z-loss), target and uniform terms.
    unit = (1 + 2 * contract.z_loss * lse)[:, None] * mean_row - (1 - eps) * target_row - eps * wbar  # (m, D)
    token_weight = (r * unit).sum(1) / unit.square().sum(1).clamp_min(1e-300)  # (m,) u_i, read off the reference
    x = torch.stack([r, token_weight[:, None] * target_row, token_weight[:, None] * wbar.expand_as(r)], dim=1)
    if not (torch.isfinite(x).all() and torch.isfinite(f).all()):
        return None  # non-finite values are the diagnosis then, and no least squares survives them
    return _cluster_fit(x, f - r, r)


def _softmax_directions(h, weight, y, contract: CEContract):
    """Per fitted token: the softmax-mean weight row, the target's weight row and the lse, over the global V.

    The logits come from the input dtype's matmul: a direction does not need exact logits.
    """
    m, d = h.shape
    tp = contract.tp_group
    mean_row = torch.zeros(m, d, dtype=torch.float64, device=h.device)
    lse = torch.empty(m, dtype=torch.float64, device=h.device)
    step = max(1, _BLOCK_ELEMENTS // max(weight.shape[0], 1))
    for start in range(0, m, step):
        block = slice(start, start + step)
        z = (h[block] @ weight.T).float()                                   # (c, V/TP)
        z_max = _dist.all_reduce(z.amax(dim=1), dist.ReduceOp.MAX, tp)    # (c,) over the TP group
        e = torch.exp(z - z_max[:, None])
        total = _dist.all_reduce(e.sum(dim=1), dist.ReduceOp.SUM, tp)     # (c,)
        mean_row[block] = (e / total[:, None]).to(weight.dtype).matmul(weight).double()  # this slice's share
        lse[block] = (z_max + total.log()).double()
    local = y - contract.vocab_start
    owned = (local >= 0) & (local < weight.shape[0])
    target_row = torch.zeros(m, d, dtype=torch.float64, device=h.device)
    target_row[owned] = weight[local[owned]].double()
    shares = _dist.all_reduce(torch.stack([mean_row, target_row]), dist.ReduceOp.SUM, tp)  # (2, m, D)
    return shares[0], shares[1], lse


def _global_mean_row(weight: torch.Tensor, contract: CEContract) -> torch.Tensor:
    total = _dist.all_reduce(weight.detach().double().sum(dim=0), dist.ReduceOp.SUM, contract.tp_group)  # (D,)
    return total / contract.vocab_size


def _cluster_fit(x: torch.Tensor, error: torch.Tensor, ref: torch.Tensor) -> SignatureFit:
    """Least squares of ``error`` (m, D) on ``x`` (m, k, D) with tokens as clusters.

    Columns are scaled to unit norm before solving (the mean weight row is ~1/sqrt(V) of a target row);
    the sandwich covariance ``A^-1 (sum_i s_i s_i^T) A^-1`` uses each token's score ``s_i = x_i^T res_i``.
    """
    m, k, _ = x.shape
    norms = x.square().sum(dim=(0, 2)).sqrt().clamp_min(1e-300)  # (k,)
    xs = x / norms[None, :, None]
    a = torch.einsum("mkd,mjd->kj", xs, xs)                          # (k, k)
    a_inv = torch.linalg.pinv(a)
    beta = a_inv @ torch.einsum("mkd,md->k", xs, error)              # (k,)
    residual = error - torch.einsum("mkd,k->md", xs, beta)          # (m, D)
    scores = torch.einsum("mkd,md->mk", xs, residual)                # (m, k)
    cov = a_inv @ (scores.T @ scores) @ a_inv * (m / max(m - k, 1))
    beta, se = beta / norms, cov.diagonal().clamp_min(0).sqrt() / norms
    ref_norm = float(ref.norm())
    rel = (lambda t: float(t.norm()) / ref_norm) if ref_norm > 0 else (lambda t: math.inf)
    values = {name: (float(beta[i]), float(se[i])) for i, name in enumerate(DIRECTIONS)}
    return SignatureFit(tokens=m, scale=values["scale"][0], scale_se=values["scale"][1],
                        target=values["target"][0], target_se=values["target"][1],
                        shift=values["shift"][0], shift_se=values["shift"][1],
                        error_rel=rel(error), residual_rel=rel(residual))
