"""Rules that read the per-token upstream weights a fused path applied (``reduction='none'``): one token's weight for
every token, or the tokens' weights in another order. Both read :class:`ce_guard.upstream_fit.UpstreamFit`, fitted
when dL/dh is over budget under a per-token upstream gradient."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ce_guard.diagnosis.causes import Diagnosis
from ce_guard.diagnosis.signals import core_evidence, excess
from ce_guard.diagnosis.thresholds import Thresholds

if TYPE_CHECKING:
    from ce_guard.parity import ParityReport
    from ce_guard.upstream_fit import UpstreamFit


def first_token(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Every token's dL/dh carries the first token's upstream weight: ``grad_output[0]`` applied to all rows
    (Liger-Kernel's fused linear-CE up to 0.8.1, Transformer Engine's ``parallel_cross_entropy`` up to 2.7)."""
    fit = _drifting_fit(r)
    if fit is None or not _explains(fit.first_residual, fit.first_scale, fit, t):
        return None
    zero = fit.first_weight == 0
    first = ("the first token's upstream gradient, 0" if zero
             else f"{fit.first_scale:.4f}x the first token's upstream gradient {fit.first_weight:.4g}")
    return Diagnosis.of("upstream_broadcast/first_token", True,
                        f"{_head(r)}: fitted on {fit.tokens} tokens, the upstream weight each token's dL/dh carries"
                        f" is {fit.applied_mean:.4g} (std {fit.applied_spread:.2g}, {fit.first_residual:.2g} of the"
                        f" upstream's std {fit.spread:.3g}) = {first}, where the tokens' own weights have mean"
                        f" {fit.weight_mean:.4g} and std {fit.weight_spread:.3g} (rms {fit.own_residual:.2f} off them,"
                        f" {fit.scaled_residual:.2f} off their best scale): the fused path applies grad_output[0] to"
                        " every token's gradient (Liger-Kernel's fused linear-CE up to 0.8.1, Transformer Engine's"
                        " parallel_cross_entropy up to 2.7)."
                        + (" The first token's weight is 0 (a masked position), so dL/dh is 0 on every token."
                           if zero else ""), _evidence(r, fit))


def order(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Every token's dL/dh carries one of the upstream's weights, but another token's: read transposed
    (``[S,B] <-> [B,S]``; Transformer Engine 2.8-2.10) or in some other order."""
    fit = _drifting_fit(r)
    if fit is None or not fit.misplaced > 0:
        return None
    moved = (f"{fit.misplaced:.0%} of {fit.tokens} tokens carry another token's weight (rms {fit.own_residual:.2f} of"
             f" the upstream's std {fit.spread:.3g} off their own)")
    if fit.transposed_residual is not None and _explains(fit.transposed_residual, fit.transposed_scale, fit, t):
        return Diagnosis.of("upstream_order/transposed", True,
                            f"{_head(r)}: {moved}, and the {fit.shape} upstream read transposed"
                            f" ({fit.transposed_read}) gives every token's weight (rms {fit.transposed_residual:.2g}"
                            f" off it at {fit.transposed_scale:.4f}x): a non-contiguous upstream gradient (an [S,B]"
                            " view of a [B,S] buffer, or the reverse) is read as if contiguous (Transformer Engine"
                            " 2.8-2.10)", _evidence(r, fit))
    if not _explains(fit.sorted_residual, fit.sorted_scale, fit, t):
        return None
    transposed = ("" if fit.transposed_residual is None
                  else f"; no transpose of the {fit.shape} upstream (rms {fit.transposed_residual:.2f} off the nearer)")
    return Diagnosis.of("upstream_order/permuted", True,
                        f"{_head(r)}: {moved}, while sorted they are the upstream's weights (rms"
                        f" {fit.sorted_residual:.2g} off at {fit.sorted_scale:.4f}x){transposed}: the fused path"
                        " applies the per-token upstream gradient in another order than its tokens (a reordering of"
                        " the tokens not undone, or the upstream's strides ignored)", _evidence(r, fit))


def _drifting_fit(r: ParityReport) -> UpstreamFit | None:
    """The upstream fit, when dL/dh is over budget (the weights a path applies show in its gradients alone)."""
    fit = r.upstream_fit
    if fit is None or r.grad_hidden_rel_err is None or r.grad_hidden_rel_err <= r.budget.grad_hidden_rel:
        return None
    return fit


def _explains(residual: float, scale: float, fit: UpstreamFit, t: Thresholds) -> bool:
    """A reading explains the applied weights at a scale near 1, and the tokens' own weights do not, scaled or not:
    a scale of the weights (dL/dh divided by the tokens in backward) brings every weight near a small first one too."""
    return (residual <= t.upstream_agreement and abs(scale - 1.0) <= t.upstream_agreement < fit.own_residual
            and fit.scaled_residual >= t.upstream_contrast * residual)


def _head(r: ParityReport) -> str:
    return (f"dL/dh error {r.grad_hidden_rel_err:.3g} is {excess(r)['dL/dh']:.1f}x budget (loss"
            f" {excess(r)['loss']:.2f}x), under a per-token upstream gradient")


def _evidence(r: ParityReport, fit: UpstreamFit) -> dict[str, float | int | str]:
    return {**core_evidence(r), **{f"upstream_{key}": value for key, value in dataclasses.asdict(fit).items()
                                   if value is not None}}
