"""Rules that read where and how the gradients are off: the TP reduction of dL/dh, errors on a vocab slice's
edges, a hidden gradient alone off (a narrow running sum, or skipped terms), and precision drift."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ce_guard.diagnosis.causes import Diagnosis
from ce_guard.diagnosis.signals import core_evidence, excess
from ce_guard.diagnosis.thresholds import Thresholds

if TYPE_CHECKING:
    from ce_guard.parity import ParityReport


def tp_grad_reduction(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Loss exact, dL/dh off because the vocab-parallel backward's all-reduce over TP is missing or doubled.

    Each rank's slice contributes a partial dL/dh; the copy-to-TP-region op sums them. Missing, the ranks'
    fused gradients sum to the reference; done twice, each is exactly TP times it.
    """
    if r.tp_size < 2 or r.grad_hidden_rel_err is None or r.loss_rel_err > r.budget.loss_rel:
        return None
    evidence = {**core_evidence(r), "tp_size": r.tp_size}
    summed = r.grad_hidden_tp_sum_rel_err
    if summed is not None and summed <= r.budget.grad_hidden_rel:
        return Diagnosis.of("tp_grad_reduction/partial", True,
                            f"loss exact but dL/dh norm ratio {r.grad_hidden_norm_ratio:.4f} (cosine"
                            f" {r.grad_hidden_cosine:.4f}), and the TP={r.tp_size} ranks' dL/dh summed matches the"
                            f" reference (rel err {summed:.3g}, budget {r.budget.grad_hidden_rel:.3g}): each rank"
                            " returns only its vocab slice's partial dL/dh; the all-reduce over TP of the output"
                            " layer's input gradient (copy-to-TP-region backward) is missing",
                            {**evidence, "grad_hidden_tp_sum_rel_err": summed})
    ratio, cosine = r.grad_hidden_norm_ratio, r.grad_hidden_cosine
    if (ratio is not None and cosine is not None and cosine >= t.scale_cosine
            and abs(ratio - r.tp_size) <= max(t.doubled_grad_scales * r.budget.grad_scale * r.tp_size, t.scale_floor)):
        return Diagnosis.of("tp_grad_reduction/doubled", True,
                            f"loss exact but dL/dh norm ratio {ratio:.4f} = TP = {r.tp_size} (cosine {cosine:.6f}):"
                            " the hidden gradient is all-reduced over TP twice (once in the loss, once in the"
                            " output layer's copy-to-TP-region backward)", evidence)
    return None


def backward_scale(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Loss exact, the gradients one factor off: the backward scales dL/dz where the forward does not.

    Nothing but that factor is left (the residual after it is within budget), so it is no rounding; the loss is
    right, so it is no divisor of the loss. A factor of 1/tokens is a per-token mean taken again in backward.
    """
    ratio, cosine, residual = r.grad_hidden_norm_ratio, r.grad_hidden_cosine, r.grad_hidden_scaled_residual
    if (ratio is None or cosine is None or residual is None or r.loss_rel_err > r.budget.loss_rel
            or (r.grad_hidden_rel_err or 0.0) <= r.budget.grad_hidden_rel or cosine < t.scale_cosine
            or residual > r.budget.grad_hidden_rel):
        return None
    counts = {"all tokens": r.n_tokens, "the non-ignored tokens": r.n_visible}
    named = [f" = 1/{count} ({name})" for name, count in counts.items()
             if count > 1 and abs(ratio * count - 1.0) <= t.scale_tolerance]
    weight = (f", dL/dW norm ratio {r.grad_weight_norm_ratio:.4g}" if r.grad_weight_norm_ratio is not None else "")
    return Diagnosis.of("backward_scale/pure_factor", True,
                        f"loss exact but dL/dh is {ratio:.4g}x the reference's{named[0] if named else ''} (cosine"
                        f" {cosine:.6f}, residual after the factor {residual:.2g}){weight}: the backward scales the"
                        " logit gradient by a factor the forward's loss does not carry (a per-token mean taken"
                        " again, or an upstream gradient read wrong)", {**core_evidence(r), "scale": ratio})


def slice_edges(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Errors piled on the vocab slice's edges: targets outside the partition clipped, or masked off by one."""
    if r.tp_size < 2:
        return None
    edge = r.grad_weight_edge_row_share or 0.0
    boundary = r.grad_hidden_boundary_share or 0.0
    on_edges = edge >= t.edge_row_share
    on_boundary = boundary >= t.boundary_share and r.boundary_token_fraction < t.boundary_tokens
    if not (on_edges or on_boundary):
        return None
    contract = r.contract
    return Diagnosis.of("target_masking/slice_edges", True,
                        f"errors sit on the vocab slice's edges (dL/dW edge rows hold {edge:.0%} of the error,"
                        f" boundary-target tokens {boundary:.0%} of the dL/dh error from"
                        f" {r.boundary_token_fraction:.1%} of tokens) at TP={r.tp_size}, slice"
                        f" [{contract.get('vocab_start')}, {contract.get('vocab_end')}): targets outside this"
                        " partition are clipped or masked off by one before the gather",
                        {**core_evidence(r), "grad_weight_edge_row_share": edge,
                         "grad_hidden_boundary_share": boundary, "boundary_token_fraction": r.boundary_token_fraction})


def hidden_gradient_sum(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Loss exact, dL/dh short, its error proportional to each element's size: a running sum rounded narrow.

    A sum over vocab blocks kept in bf16 rounds every element relative to its own size (coupling 2-4). When
    dL/dW is further over its budget, the narrow accumulator is the general one (``precision``).
    """
    margins = _hidden_gradient_alone(r, t)
    coupling = r.grad_hidden_magnitude_coupling or 0.0
    if margins is None or coupling < t.rounding_coupling or margins["dL/dW"] > margins["dL/dh"]:
        return None
    return Diagnosis.of("accumulator_dtype/hidden_gradient_sum", True,
                        f"{_hidden_head(r, margins, coupling)} (each element rounded relative to its own size;"
                        " skipped terms give ~1): the hidden gradient carries a narrower dtype's rounding than the"
                        " inputs': its sum over vocab blocks, or the logit gradient itself, is kept in bf16 or the"
                        " input dtype", _hidden_evidence(r, margins, coupling))


def skipped_terms(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Loss exact, dL/dh short, its error blind to each element's size (coupling about 1): terms skipped."""
    margins = _hidden_gradient_alone(r, t)
    coupling = r.grad_hidden_magnitude_coupling or 0.0
    if margins is None or coupling >= t.rounding_coupling:
        return None
    return Diagnosis.of("gradient_approximation/skipped_terms", True,
                        f"{_hidden_head(r, margins, coupling)} (the error ignores each element's size; a narrow"
                        " running sum gives 2-4): the backward skips small terms (e.g. a gradient filter on"
                        " small-probability blocks)", _hidden_evidence(r, margins, coupling))


def loss_only(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Over budget, and only the loss: a factor too small for the gradients to resolve at this dtype."""
    found = _rounding_sized(r, t)
    if found is None or found[0]["dL/dh"] > 1.0 or found[0]["dL/dW"] > 1.0:
        return None
    margins, evidence = found
    return Diagnosis.of("unexplained/loss_only", True,
                        f"only the loss is off ({r.loss_ratio:.5f}x, {margins['loss']:.1f}x its budget) while dL/dh"
                        " and dL/dW are within budget: a scale, penalty or reduced-precision accumulator too small"
                        " for the gradients to resolve at this dtype; watch whether it grows", evidence)


def precision(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Errors over budget with the gradients' scale and direction kept, worst on the loss or dL/dW: accumulators."""
    found = _rounding_sized(r, t)
    if found is None:
        return None
    margins, evidence = found
    worst = max(margins, key=margins.get)
    if margins["loss"] <= 1.0 and worst == "dL/dh":
        return None  # the hidden gradient off in no way hidden_gradient_sum or skipped_terms knows: unexplained
    ratio = r.grad_hidden_norm_ratio or 1.0
    return Diagnosis.of("accumulator_dtype/precision", True,
                        f"scale ratio {ratio:.4f}, cosine"
                        f" {r.grad_hidden_cosine if r.grad_hidden_cosine is not None else 1:.6f}, errors above budget"
                        f" (loss {margins['loss']:.1f}x, dL/dh {margins['dL/dh']:.1f}x,"
                        f" dL/dW {margins['dL/dW']:.1f}x),"
                        f" worst on {worst}: accumulators (running max, denominator or weight gradient) are kept in a"
                        " narrower dtype than the contract declares", evidence)


def _hidden_gradient_alone(r: ParityReport, t: Thresholds) -> dict[str, float] | None:
    """The margins when the loss is within budget and dL/dh over it, still the reference's direction and more than a
    pure scale off; None otherwise."""
    margins = excess(r)
    if (r.grad_hidden_rel_err is None or margins["dL/dh"] <= 1.0 or margins["loss"] > 1.0
            or (r.grad_hidden_cosine or 0.0) < t.gradient_cosine
            or (r.grad_hidden_scaled_residual or 0.0) <= r.budget.grad_hidden_rel):
        return None
    return margins


def _hidden_head(r: ParityReport, margins: dict[str, float], coupling: float) -> str:
    ratio = r.grad_hidden_norm_ratio
    return (f"loss exact ({margins['loss']:.2f}x budget) but dL/dh error {r.grad_hidden_rel_err:.3g} is"
            f" {margins['dL/dh']:.1f}x budget, norm ratio {ratio:.4f}"
            f" ({'short' if ratio < 1 else 'long'}), error-to-size coupling {coupling:.2f}")


def _hidden_evidence(r: ParityReport, margins: dict[str, float], coupling: float) -> dict[str, float | int]:
    return {**core_evidence(r), **{f"excess_{k}": v for k, v in margins.items()},
            "grad_hidden_magnitude_coupling": coupling}


def _rounding_sized(r: ParityReport, t: Thresholds) -> tuple[dict[str, float], dict] | None:
    """dL/dh's norm and direction kept to rounding: (the margins, the evidence); None otherwise."""
    ratio = r.grad_hidden_norm_ratio or 1.0
    cosine = r.grad_hidden_cosine
    if abs(ratio - 1.0) > t.precision_ratio or (cosine is not None and cosine < t.gradient_cosine):
        return None
    margins = excess(r)
    return margins, {**core_evidence(r), **{f"excess_{k}": v for k, v in margins.items()}}
