"""Rules that read the per-token upstream weights a fused path applied (``reduction='none'``): one token's weight for
every token, or the tokens' weights in another order. Both read :class:`ce_guard.upstream_fit.UpstreamFit`, fitted
when dL/dh is over budget under a per-token upstream gradient."""

from __future__ import annotations

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
    if fit is None or not _explains(fit.first_residual, fit, t):
        return None
    zero = (" The first token's weight is 0 (a masked position), so dL/dh is 0 on every token." if fit.first_weight == 0
            else "")
    return Diagnosis.of("upstream_broadcast/first_token", True,
                        f"{_head(r)}: fitted on {fit.tokens} tokens, the upstream weight each token's dL/dh carries is"
                        f" {fit.applied_mean:.4g} (std {fit.applied_spread:.2g}) = the first token's upstream gradient"
                        f" {fit.first_weight:.4g} (rms {fit.first_residual:.2g} of the upstream's std"
                        f" {fit.spread:.3g}), where the tokens' own weights have mean {fit.weight_mean:.4g} and std"
                        f" {fit.weight_spread:.3g} (rms {fit.own_residual:.2f} off them, {fit.scaled_residual:.2f} off their best"
                        f" scale): the fused path applies"
                        " grad_output[0] to every token's gradient (Liger-Kernel's fused linear-CE up to 0.8.1,"
                        f" Transformer Engine's parallel_cross_entropy up to 2.7).{zero}", _evidence(r, fit))


def order(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Every token's dL/dh carries one of the upstream's weights, but another token's: read transposed
    (``[S,B] <-> [B,S]``; Transformer Engine 2.8-2.10) or in some other order."""
    fit = _drifting_fit(r)
    if fit is None or not fit.misplaced > 0:
        return None
    moved = (f"{fit.misplaced:.0%} of {fit.tokens} tokens carry another token's weight (rms {fit.own_residual:.2f} of"
             f" the upstream's std {fit.spread:.3g} off their own)")
    if fit.transposed_residual is not None and _explains(fit.transposed_residual, fit, t):
        return Diagnosis.of("upstream_order/transposed", True,
                            f"{_head(r)}: {moved}, and the {fit.shape} upstream read transposed"
                            f" ({fit.transposed_read}) gives every token's weight (rms {fit.transposed_residual:.2g} off it): a non-contiguous"
                            " upstream gradient (an [S,B] view of a [B,S] buffer, or the reverse) is read as if"
                            " contiguous (Transformer Engine 2.8-2.10)", _evidence(r, fit))
    if not _explains(fit.sorted_residual, fit, t):
        return None
    transposed = ("" if fit.transposed_residual is None
                  else f"; no transpose of the {fit.shape} upstream (rms {fit.transposed_residual:.2f} off the nearer)")
    return Diagnosis.of("upstream_order/permuted", True,
                        f"{_head(r)}: {moved}, while sorted they are the upstream's weights (rms"
                        f" {fit.sorted_residual:.2g} off){transposed}: the fused path applies the per-token upstream"
                        " gradient in another order than its tokens (a reordering of the tokens not undone, or the"
                        " upstream's strides ignored)", _evidence(r, fit))


def _drifting_fit(r: ParityReport) -> UpstreamFit | None:
    """The upstream fit, when dL/dh is over budget (the weights a path applies show in its gradients alone)."""
    fit = r.upstream_fit
    if fit is None or r.grad_hidden_rel_err is None or r.grad_hidden_rel_err <= r.budget.grad_hidden_rel:
        return None
    return fit


def _explains(residual: float, fit: UpstreamFit, t: Thresholds) -> bool:
    """A reading explains the applied weights, and the tokens' own weights do not, scaled or not: a scale of the
    weights (dL/dh divided by the tokens in backward) brings every weight near a small first one too."""
    return (residual <= t.upstream_agreement < fit.own_residual
            and min(fit.own_residual, fit.scaled_residual) >= t.upstream_contrast * residual)


def _head(r: ParityReport) -> str:
    return (f"dL/dh error {r.grad_hidden_rel_err:.3g} is {excess(r)['dL/dh']:.1f}x budget (loss"
            f" {excess(r)['loss']:.2f}x), under a per-token upstream gradient")


def _evidence(r: ParityReport, fit: UpstreamFit) -> dict[str, float | int | str]:
    found = {f"upstream_{key}": getattr(fit, key)
             for key in ("tokens", "shape", "spread", "first_weight", "weight_mean", "weight_spread", "applied_mean",
                         "applied_spread", "noise", "own_residual", "own_scale", "scaled_residual", "first_residual",
                         "sorted_residual", "misplaced",
                         "transposed_residual", "transposed_read")}
    return {**core_evidence(r), **{key: value for key, value in found.items() if value is not None}}
