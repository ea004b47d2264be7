"""Rules for a loss offset per token that log(TP), z-loss or local-V label smoothing explains, and for local-V
smoothing read from the gradients when its loss offset vanishes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ce_guard.diagnosis.causes import Diagnosis
from ce_guard.diagnosis.signals import close, core_evidence, headline, z_loss_over_all_positions
from ce_guard.diagnosis.thresholds import Thresholds

if TYPE_CHECKING:
    from ce_guard.parity import ParityReport


def denominator_twice(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Loss higher by log(size) of a group: logits gathered over TP, then the denominator summed over it again."""
    offset = _offset(r)
    if offset is None:
        return None
    for name, size in sizes.items():
        if size > 1 and close(offset, math.log(size), t.offset_tolerance):
            return Diagnosis.of("log_tp_offset/denominator_twice", True,
                                f"loss higher by {offset:.5f} per token = log({size}) = log({name}): the denominator"
                                " was summed over the group twice (logits gathered, then reduced again)",
                                {**core_evidence(r), "loss_offset_per_token": offset})
    return None


def z_loss(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Loss off by -z * mean(lse^2) (z-loss dropped) or +z * mean(lse^2) (applied twice).

    Per visible token for a per-token z-loss; for a z-loss over all positions, in the loss itself, since that
    term is one mean over every row that no divisor touches.
    """
    if z_loss_over_all_positions(r):
        return _z_loss_over_all_positions(r, t)
    offset, z = _offset(r), r.contract.get("z_loss", 0.0) or 0.0
    if offset is None or not z or not abs(offset) > 0 or not close(abs(offset), z * r.mean_lse_sq, t.offset_tolerance):
        return None
    how = "missing from" if offset < 0 else "applied twice in"
    return Diagnosis.of(f"z_loss_boundary/{'missing' if offset < 0 else 'doubled'}", True,
                        f"loss offset {offset:.6g} per token = {'-' if offset < 0 else '+'}z * mean(lse^2)"
                        f" = {z:g} * {r.mean_lse_sq:.4g}: z-loss is {how} the fused path",
                        {**core_evidence(r), "loss_offset_per_token": offset})


def _z_loss_over_all_positions(r: ParityReport, t: Thresholds) -> Diagnosis | None:
    z, offset = r.contract["z_loss"], r.loss_fused - r.loss_ref
    if (abs(offset) <= r.budget.loss_rel * max(abs(r.loss_ref), 1e-12)
            or not close(abs(offset), z * r.mean_lse_sq, t.offset_tolerance)):
        return None
    how = "missing from" if offset < 0 else "applied twice in"
    return Diagnosis.of(f"z_loss_boundary/{'missing' if offset < 0 else 'doubled'}", True,
                        f"loss off by {offset:.6g} = {'-' if offset < 0 else '+'}z * mean(lse^2) over all"
                        f" {r.n_tokens} rows = {z:g} * {r.mean_lse_sq:.4g}: the z-loss over all positions is {how}"
                        " the fused path", {**core_evidence(r), "loss_offset": offset})


def smoothing_offset(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Loss off by what smoothing over this rank's vocab slice predicts, or differing across the TP ranks."""
    offset, eps = _offset(r), r.contract.get("label_smoothing", 0.0) or 0.0
    if offset is None or not eps:
        return None
    if not (close(offset, r.smoothing_local_offset, t.offset_tolerance)
            or r.fused_loss_tp_spread > t.rank_spread_share * abs(offset)):
        return None
    return Diagnosis.of("label_smoothing_local_v/loss_offset", True,
                        f"loss offset {offset:.6g} per token (local-V smoothing predicts"
                        f" {r.smoothing_local_offset:.6g}); fused loss differs across TP ranks by"
                        f" {r.fused_loss_tp_spread:.3g}: label smoothing uses the local vocab slice",
                        {**core_evidence(r), "loss_offset_per_token": offset,
                         "smoothing_local_offset": r.smoothing_local_offset,
                         "fused_loss_tp_spread": r.fused_loss_tp_spread})


def gradient_shift(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Local-V smoothing read from the gradients, for when the loss barely moves (zero-mean logits).

    The uniform term eps/V_local instead of eps/V shifts dL/dz by one constant over this rank's slice:
    dL/dW gains the same vector on every row, dL/dh (equal token weights) the same on every token, while
    the loss moves only by the local-V offset, which vanishes when the slices' mean logits agree.
    """
    eps = r.contract.get("label_smoothing", 0.0) or 0.0
    if not eps or r.tp_size < 2:
        return None
    unexplained_offset = abs(r.loss_offset_per_token - r.smoothing_local_offset)
    if unexplained_offset > r.budget.loss_rel * max(abs(r.loss_ref), 1e-12):
        return None
    grads = (("dL/dh", r.grad_hidden_rel_err, r.budget.grad_hidden_rel, r.grad_hidden_shift_share),
             ("dL/dW", r.grad_weight_rel_err, r.budget.grad_weight_rel, r.grad_weight_shift_share))
    off = [(name, share) for name, err, budget, share in grads if (err or 0.0) > budget]
    if not off or any(share < t.shift_share for _, share in off):
        return None
    shares = ", ".join(f"{name} {share:.1%}" for name, share in off)
    return Diagnosis.of("label_smoothing_local_v/gradient_shift", True,
                        f"the gradient error is one constant shift of dL/dz over this vocab slice ({shares} of"
                        f" it in a common row) at TP={r.tp_size}, label smoothing {eps:g}, loss offset"
                        f" {r.loss_offset_per_token:.3g} per token (local-V smoothing predicts"
                        f" {r.smoothing_local_offset:.3g}): label smoothing's uniform term uses the local vocab slice",
                        {**core_evidence(r), "loss_offset_per_token": r.loss_offset_per_token,
                         "smoothing_local_offset": r.smoothing_local_offset,
                         **{f"shift_share_{name}": share for name, share in off}})


def _offset(r: ParityReport) -> float | None:
    """The loss offset per visible token when it is over the loss's budget; None when rounding explains it."""
    offset = r.loss_offset_per_token
    return None if abs(offset) <= r.budget.loss_rel * max(abs(r.loss_ref), 1e-12) else offset


def penalty_normalization(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """The z-loss or the L2-warp taken over another set of rows than the contract's: the reference under the other
    set reproduces the seam (fitted by :func:`ce_guard.transform_fit.fit_output_transform` on checks over budget)."""
    fit = r.output_transform
    if fit is None or not fit.mistake.startswith(("z_loss_over_", "l2_warp_over_")):
        return None
    if fit.mistake.startswith("z_loss_over_"):
        what, field, default, fitted = "the z-loss is taken", "z_loss_positions", "counted", fit.z_loss_positions
        rows = {"all": "every row (ignored positions included, one mean apart from the tokens')",
                "counted": "the counted tokens only (inside the tokens' mean)"}
    else:
        what, field, default = "the L2-warp penalty's gradient is averaged", "l2_warp_rows", "all"
        fitted = fit.l2_warp_rows
        rows = {"all": f"every row ({r.n_tokens}, fla's l2_warp)",
                "counted": f"the loss's divisor ({r.divisor:g}: the non-ignored tokens of a mean)"}
    return Diagnosis.of(f"penalty_normalization/{fit.mistake}", True,
                        f"{headline(r)}: {what} over {rows[fitted]} where the contract says"
                        f" {rows[r.contract.get(field, default)]}; the reference under that set matches the seam"
                        f" (loss rel err {fit.loss_rel_err:.2g}, dL/dh rel err {fit.grad_hidden_rel_err:.2g}): the"
                        " penalty is normalised over another token set than the contract's",
                        {**core_evidence(r), f"fitted_{field}": fitted})


def l2_warp_upstream(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """The L2-warp penalty's gradient not multiplied by the upstream gradient (fla 0.3.0-0.5.1's ``l2_warp``
    backward): the reference with the factor divided by the upstream reproduces the seam (fitted by
    :func:`ce_guard.transform_fit.fit_output_transform` on checks over budget)."""
    fit = r.output_transform
    if fit is None or fit.mistake != "l2_warp_upstream_ignored":
        return None
    declared = r.contract.get("l2_warp", 0.0)
    return Diagnosis.of("backward_scale/l2_warp_upstream_ignored", True,
                        f"{headline(r)}: the L2-warp penalty's gradient is not scaled by the upstream gradient"
                        f" ({declared / fit.l2_warp:g}): the reference with factor {fit.l2_warp:g} in place of"
                        f" {declared:g} matches the seam (loss rel err {fit.loss_rel_err:.2g}, dL/dh rel err"
                        f" {fit.grad_hidden_rel_err:.2g}); the penalty's backward drops grad_output",
                        {**core_evidence(r), "fitted_l2_warp": fit.l2_warp})
