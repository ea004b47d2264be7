"""Which upstream weight each token's dL/dh carries, when the loss is per token (``reduction='none'``).

With per-token losses, training's backward hands the seam one upstream gradient per token, ``u_i`` (a masked mean
or RL weights taken outside the layer, as Megatron and many RL losses do), and token i's dL/dh row must carry its
own: ``u_i r_i``, with ``r_i`` the token's gradient at weight 1. A fused path can compute every per-token loss right
and still apply the wrong weights in backward: one token's weight for all (Liger-Kernel's fused linear-CE up to
0.8.1 multiplied every row by ``grad_output[0]``), or the right weights in another order (Transformer Engine 2.8-2.10
read an ``[S,B]`` view of a ``[B,S]`` buffer as if it were contiguous).

Per token, the weight the fused path applied is fitted along the reference's row, in float64:
``w'_i = <f_i, g_i> / <g_i, g_i> * u_i`` (``f`` the fused dL/dh, ``g`` the reference's), on the visible tokens whose
weight is not 0 and whose gradient at weight 1 is not negligible. ``w'`` is then read against candidates, each at its
best scale, as an rms residual in units of the upstream's spread over this rank's tokens: the tokens' own weights
(0 for a correct path; a scale of them is a divide missing or taken twice, not a fault of the weights), one value for
every token (the first token's weight), and the weights' own values in another order (their sorted values, and the
``[S,B] <-> [B,S]`` transposes where the upstream is 2-D). Local to each rank: under TP every rank holds the same
tokens, the same upstream and the same (all-reduced) dL/dh, so all fit the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_BLOCK_ELEMENTS = 1 << 24  # float64 rows of dL/dh read at a time (128 MiB), as ce_guard.parity reads gradients
# Tokens fitted: their gradient at weight 1 is at least this share of the typical token's (rms). A token the model
# predicts with certainty has none, and its weight cannot be read from it.
_GRADIENT_FLOOR = 2.0 ** -10
# A token carries another token's weight when its fitted weight is off its own by more than this share of the
# weights' spread and by more than 6 standard errors of the fit (rounding in the fused path's dL/dh). A sixteenth:
# above the scale by which a bf16 path within budget rounds every weight (Liger-Kernel's bf16 dL/dh reads 0.993-0.996
# of the reference's), times the largest weight over the spread (2 / 0.6 for weights uniform in [0, 2]).
MISPLACED_SHARE = 2.0 ** -4
MISPLACED_SIGMAS = 6.0


@dataclass(frozen=True)
class UpstreamFit:
    """The upstream weights the fused path applied, fitted per token, held to what they should have been.

    Residuals are rms over the fitted tokens in units of ``spread``, the upstream's standard deviation over this
    rank's tokens (ignored ones included): 0 where the reading explains the applied weights exactly, about 1 or
    more where it does not. Each reading is taken at its best scale (``*_scale``, least squares): a path rounds
    every weight by a common factor within its budget (Liger-Kernel's bf16 dL/dh reads 0.993-0.996 of the
    reference's), and that factor, near 1, is told apart from the shape of the weights.
    """

    tokens: int                # tokens fitted
    shape: str                 # the upstream's shape, e.g. "[36,8]"
    spread: float              # std of the upstream over all of this rank's tokens
    first_weight: float        # the upstream's first element, grad_output[0]
    weight_mean: float         # mean of the fitted tokens' own weights u_i ...
    weight_spread: float       # ... and their std: the spread the applied weights should have had
    applied_mean: float        # mean of the applied weights w'_i ...
    applied_spread: float      # ... and their std
    noise: float               # rms standard error of w'_i (rounding in the fused dL/dh), in units of spread
    own_residual: float        # w' against each token's own weight u_i
    own_scale: float           # the factor k of the best scale of the own weights, k u (1 for a correct path) ...
    scaled_residual: float     # ... and w' against it: what a scale (a divide missing or taken twice) leaves
    first_scale: float         # w' against the first token's weight for every token: the scale (applied / first) ...
    first_residual: float      # ... and what is left (the applied weights' spread)
    sorted_scale: float        # sorted w' against the upstream's sorted values (fitted tokens', or all tokens') ...
    sorted_residual: float
    misplaced: float           # share of fitted tokens whose applied weight is not their own
    transposed_scale: float | None     # w' against the upstream read transposed (2-D upstream only) ...
    transposed_residual: float | None
    transposed_read: str | None        # ... which of the two, e.g. "its [8,36] buffer read as [36,8]"


def fit_upstream(grad_fused: torch.Tensor | None, grad_ref: torch.Tensor | None, token_weight: torch.Tensor | None,
                 upstream: torch.Tensor | float | None, targets_shape: torch.Size) -> UpstreamFit | None:
    """Fit the weight the fused path applied to each token's dL/dh and read it against the upstream gradient.

    Args:
        grad_fused: dL/dh as the fused path produced it, ``[..., D]``.
        grad_ref: the reference's dL/dh on the same tokens, under the same upstream.
        token_weight: the reference's weight per token, flat (the upstream, 0 where the target is ignored).
        upstream: the per-token upstream gradient as training delivered it (the per-token loss's shape).
        targets_shape: the targets' shape: the upstream's 2-D shape when it came flat.

    Returns:
        An :class:`UpstreamFit`; None where there is nothing to fit: no gradient, a scalar or constant upstream
        (it then weighs every token alike), an upstream of another size than the tokens, or fewer than two tokens
        to fit.

    Example:
        >>> g = torch.randn(6, 4, dtype=torch.float64)
        >>> u = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.25, 0.75], dtype=torch.float64)
        >>> fit = fit_upstream(u[0] * g, u[:, None] * g, u, u, torch.Size([6]))
        >>> round(fit.first_residual, 12), round(fit.own_residual, 3)
        (0.0, 1.306)
    """
    if grad_fused is None or grad_ref is None or token_weight is None or not torch.is_tensor(upstream):
        return None
    d = grad_ref.shape[-1]
    f, g = grad_fused.detach().reshape(-1, d), grad_ref.detach().reshape(-1, d)  # (N, D) each
    raw = upstream.detach().reshape(-1).double()                                  # (N,) every token's upstream
    u = token_weight.detach().reshape(-1).double()                                # (N,) 0 where ignored
    if raw.numel() != g.shape[0] or u.numel() != g.shape[0] or not bool(torch.isfinite(raw).all()):
        return None
    spread = float(raw.std(unbiased=False))
    if not spread > 0:
        return None  # one weight for every token: applied in any order, or broadcast, it is the same
    dot, ref_sq, perp_sq = _row_projections(f, g)
    fitted = (u != 0) & (ref_sq > 0)
    unit_sq = torch.where(fitted, ref_sq / u.square(), 0.0)                       # |r_i|^2, the gradient at weight 1
    if int(fitted.sum()) < 2:
        return None
    fitted &= unit_sq >= _GRADIENT_FLOOR ** 2 * unit_sq[fitted].mean()
    if int(fitted.sum()) < 2:
        return None
    w = (dot / ref_sq * u)[fitted]                                                # (m,) the applied weights
    se = (perp_sq / max(d - 1, 1) / unit_sq).sqrt()[fitted]                       # (m,) their standard errors
    own = u[fitted]
    off = (w - own).abs()
    misplaced = (off > MISPLACED_SHARE * spread) & (off > MISPLACED_SIGMAS * se)
    shape = _upstream_shape(upstream, targets_shape)
    scaled, own_scale = _reading(w, own)
    first_residual, first_scale = _reading(w, raw[0].expand_as(w))
    ranked = w.sort().values  # a reordering: among the fitted tokens, or over all (masked positions included)
    sorted_residual, sorted_scale = min(_reading(ranked, own.sort().values),
                                        _reading(ranked, _quantiles(raw, w.numel())))
    transposed_residual, transposed_scale, read = _transposed(w, raw, fitted, shape)
    return UpstreamFit(
        tokens=int(w.numel()), shape=f"[{','.join(map(str, shape))}]", spread=spread, first_weight=float(raw[0]),
        weight_mean=float(own.mean()), weight_spread=float(own.std(unbiased=False)), applied_mean=float(w.mean()),
        applied_spread=float(w.std(unbiased=False)), noise=_rms(se) / spread, own_residual=_rms(w - own) / spread,
        own_scale=own_scale, scaled_residual=scaled / spread, first_scale=first_scale,
        first_residual=first_residual / spread, sorted_scale=sorted_scale, sorted_residual=sorted_residual / spread,
        misplaced=float(misplaced.double().mean()), transposed_scale=transposed_scale,
        transposed_residual=None if transposed_residual is None else transposed_residual / spread,
        transposed_read=read)


def _reading(w: torch.Tensor, candidate: torch.Tensor) -> tuple[float, float]:
    """(rms of ``w - s * candidate``, s) at the least-squares s; s = 1 for a candidate of zeros (nothing to scale)."""
    sq = float(candidate.square().sum())
    s = float((w * candidate).sum()) / sq if sq > 0 else 1.0
    return _rms(w - s * candidate), s


def _row_projections(f: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row in float64, a block of rows at a time: <f, g>, |g|^2 and |f - a g|^2 at a = <f, g> / |g|^2 (what the
    one weight leaves over: the fused path's rounding, or any fault beside the weight)."""
    n, d = g.shape
    dot, ref_sq, perp_sq = (torch.zeros(n, dtype=torch.float64, device=g.device) for _ in range(3))
    step = max(1, _BLOCK_ELEMENTS // max(d, 1))
    for start in range(0, n, step):
        rows = slice(start, start + step)
        fb, gb = f[rows].double(), g[rows].double()                               # (rows, D)
        dot[rows], ref_sq[rows] = (fb * gb).sum(1), gb.square().sum(1)
        a = torch.where(ref_sq[rows] > 0, dot[rows] / ref_sq[rows], 0.0)
        perp_sq[rows] = (fb - a[:, None] * gb).square().sum(1)  # directly: |f|^2 - <f,g>^2/|g|^2 cancels to nothing
    return dot, ref_sq, perp_sq


def _upstream_shape(upstream: torch.Tensor, targets_shape: torch.Size) -> tuple[int, ...]:
    """The upstream's own shape, or the targets' where it came flat (a per-token loss returned as ``(N,)``)."""
    if upstream.dim() < 2 and len(targets_shape) >= 2 and math.prod(targets_shape) == upstream.numel():
        return tuple(targets_shape)
    return tuple(upstream.shape)


def _transposed(w: torch.Tensor, raw: torch.Tensor, fitted: torch.Tensor,
                shape: tuple[int, ...]) -> tuple[float | None, float | None, str | None]:
    """The better of the two transposed reads of a 2-D ``[a, b]`` upstream, its ``[b, a]`` transpose's memory read
    as ``[a, b]`` or its memory read as a ``[b, a]`` buffer transposed: (residual, scale, which); all None for
    another shape."""
    if len(shape) != 2 or min(shape) < 2:
        return None, None, None
    a, b = shape
    reads = {f"its [{b},{a}] buffer read as [{a},{b}]": raw.reshape(a, b).T.reshape(-1),  # the weights in [b, a] order
             f"its [{a},{b}] buffer read as a [{b},{a}] one, transposed": raw.reshape(b, a).T.reshape(-1)}
    found = {name: _reading(w, order[fitted]) for name, order in reads.items()}
    best = min(found, key=found.get)
    return *found[best], best


def _quantiles(values: torch.Tensor, m: int) -> torch.Tensor:
    """``m`` evenly spaced order statistics of ``values``: what m of them drawn in any order look like, sorted."""
    ranks = ((torch.arange(m, dtype=torch.float64, device=values.device) + 0.5) * values.numel() / m).long()
    return values.sort().values[ranks.clamp(max=values.numel() - 1)]


def _rms(t: torch.Tensor) -> float:
    return float(t.square().mean().sqrt()) if t.numel() else 0.0
