"""Rules for loss and gradients off by a factor: one a token count or a group size explains, one the signature fit
reads (a scale, or a narrow accumulator's rounding that looks like one), one only the gradients' norms carry."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ce_guard.diagnosis.causes import Diagnosis
from ce_guard.diagnosis.signals import close, core_evidence, fit_evidence, groups_of_size, headline, loss_factor
from ce_guard.diagnosis.thresholds import Thresholds

if TYPE_CHECKING:
    from ce_guard.parity import ParityReport
    from ce_guard.signature import SignatureFit


def token_count(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """The fused mean divides by another count of visible tokens than the contract's."""
    return _divisor(r, sizes, t, padding=False)


def padding_in_divisor(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """The fused mean divides by every token, ignored ones included."""
    return _divisor(r, sizes, t, padding=True)


def integer_k(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """A scale by an integer k: a divide by a group's size, or by the accumulation steps, missing or doubled."""
    ratio = _scale_factor(r, t)
    if ratio is None:
        return None
    k = round(ratio) if ratio >= 1 else round(1 / ratio)
    if k < 2 or not _matches(ratio, k if ratio >= 1 else 1 / k, r, t):
        return None
    group = groups_of_size(k, sizes)
    owner = (f"k = {k} = {group} size" if group else f"k = {k} matches no parallel group or"
             f" accumulation size ({', '.join(f'{n}={s}' for n, s in sizes.items())})")
    return Diagnosis.of("normalization_scale/integer_k", True,
                        f"{_scale_head(r, ratio)}, {owner}: loss and gradients are {k}x"
                        f" {'too large' if ratio > 1 else 'too small'}; a divide by the {group or 'group'} size (or by"
                        " the accumulation steps) is missing or doubled",
                        {**core_evidence(r), "scale": ratio, "k": k})


def narrow_softmax_and_scale(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """A fitted factor loss and dL/dh share, and each token's softmax off by its own factor: a narrow dtype's.

    A narrow accumulator carries a factor too (the mean's 1/count rounded), and tells itself apart by what a scale
    lacks: a per-token softmax spread wider than a pure scale's (or the native path's) rounding.
    """
    fit, _ = _fitted_scale(r, t)
    if fit is None or not (fit.spread_sigmas() >= t.name_spread_sigmas and fit.softmax_excess >= t.narrow_softmax):
        return None
    return Diagnosis.of("accumulator_dtype/narrow_softmax_and_scale", True,
                        f"loss {r.loss_ratio:.5f}x and dL/dh {1 + fit.scale:.5f}x ({fit.sigmas('scale'):.0f} sigma,"
                        f" fitted on {fit.tokens} tokens), and each token's softmax is off by its own factor: their"
                        f" spread is {fit.softmax_spread:.2f}x"
                        f" {'the native path' if fit.pure_scale is None else 'a pure scale'}'s"
                        f" ({fit.spread_sigmas():.0f} sigma, rms {fit.softmax_excess:.1e} beyond it): the softmax's"
                        " statistics (running max, sum-exp, lse) and the mean's 1/count are held in a narrower dtype"
                        " than the contract declares",
                        {**core_evidence(r), "scale": r.loss_ratio, **fit_evidence(fit)})


def rounded_reciprocal(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """A fitted factor nearer the 16-bit rounding of 1/count than the gradients' own: the mean's 1/count is narrow."""
    fit, kappa = _fitted_scale(r, t)
    rounded = None if fit is None else _rounded_reciprocal(r, kappa)
    if rounded is None or not abs(kappa - rounded[1]) < abs(kappa - _gradient_factor(fit, kappa)):
        return None
    dtype, excess = rounded
    return Diagnosis.of("accumulator_dtype/rounded_reciprocal", True,
                        f"loss {r.loss_ratio:.5f}x and dL/dh {1 + fit.scale:.5f}x ({fit.sigmas('scale'):.0f} sigma,"
                        f" fitted on {fit.tokens} tokens): the loss's factor is nearer {1 + excess:.5f}x, which is"
                        f" 1/{r.divisor:g} rounded to {dtype}, than the gradients' own: the mean's 1/count is held in"
                        f" {dtype} (a scale of exactly that size would read the same)",
                        {**core_evidence(r), "scale": r.loss_ratio, "rounded_reciprocal_excess": excess,
                         **fit_evidence(fit)})


def fitted_factor(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Loss and dL/dh carry one factor that no count explains, read from the fit to dL/dh's own direction.

    The norm ratio cannot resolve a factor under one roundoff of the gradients' dtype (bf16: 0.39%); its
    projection on the reference gradient can, to the fit's standard error.
    """
    fit, kappa = _fitted_scale(r, t)
    if fit is None:
        return None
    return Diagnosis.of("normalization_scale/fitted_factor", True,
                        f"loss {r.loss_ratio:.5f}x and dL/dh {1 + fit.scale:.5f}x ({fit.sigmas('scale'):.0f} sigma,"
                        f" fitted on {fit.tokens} tokens), nothing but rounding beside it: loss and gradients are"
                        f" {r.loss_ratio:.4g}x {'too large' if kappa > 0 else 'too small'}, a factor no token count or"
                        " group size explains: the loss is divided by another count than the contract's",
                        {**core_evidence(r), "scale": r.loss_ratio, **fit_evidence(fit)})


def different_factors(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Loss and dL/dh off by *different* factors, each no larger than a narrow dtype's rounding.

    A running max, sum-exp or loss total kept in bf16, or the mean's 1/count rounded to bf16, moves the loss by its
    own rounding and the gradients by another (or not at all); a scale moves both alike.
    """
    fit, kappa = r.signature, loss_factor(r)
    if fit is None or kappa is None or abs(kappa) > t.narrow_rounding or abs(fit.scale) > t.narrow_rounding:
        return None
    if not _fit_clean_beside_scale(r, t):
        return None
    grads = (f"dL/dh carries {1 + fit.scale:.5f}x ({fit.sigmas('scale'):.0f} sigma)" if fit.sigmas("scale") >= t.significant
             else f"dL/dh carries no factor ({fit.scale:+.1e} +- {fit.scale_se:.1e})")
    return Diagnosis.of("accumulator_dtype/different_factors", True,
                        f"loss {r.loss_ratio:.5f}x ({r.loss_rel_err / r.budget.loss_rel:.1f}x its budget) while"
                        f" {grads},"
                        f" fitted on {fit.tokens} tokens: loss and gradients are off by different factors, each within"
                        f" two bf16 roundoffs ({t.narrow_rounding:.2%}): a running max, sum-exp, loss total or the"
                        " mean's 1/count is kept in a narrower dtype than the contract declares",
                        {**core_evidence(r), **fit_evidence(fit)})


def norm_factor(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """A pure scale that no count explains: only when the gradients visibly carry the loss's factor too.

    Rounding can bias a gradient's norm ratio by up to ``budget.grad_scale`` (less than the per-element budget), so
    each gradient's ratio must sit farther than that from 1 and nearer than that to the loss ratio, with only
    rounding left after the scale.
    """
    ratio = _scale_factor(r, t)
    if ratio is None or r.grad_hidden_norm_ratio is None or r.grad_hidden_scaled_residual is None:
        return None
    noise = r.budget.grad_scale
    for grad_ratio, residual, budget in (
            (r.grad_hidden_norm_ratio, r.grad_hidden_scaled_residual, r.budget.grad_hidden_rel),
            (r.grad_weight_norm_ratio, r.grad_weight_scaled_residual, r.budget.grad_weight_rel)):
        if grad_ratio is None:
            continue
        if abs(grad_ratio - 1.0) <= noise or abs(grad_ratio - ratio) > noise or residual > budget:
            return None
    return Diagnosis.of("normalization_scale/norm_factor", True,
                        f"{_scale_head(r, ratio)}: loss and gradients are {ratio:.4g}x"
                        f" {'too large' if ratio > 1 else 'too small'}, a pure scale (dL/dh residual after it"
                        f" {r.grad_hidden_scaled_residual:.2g}) that no token count or group size explains: the loss"
                        " is divided by another count than the contract's", {**core_evidence(r), "scale": ratio})


def _scale_factor(r: ParityReport, t: Thresholds) -> float | None:
    """The factor loss and dL/dh share, if they share one; None when there is no scale beyond rounding.

    The loss carries this rank's divisor exactly; dL/dh can mix several ranks' divisors (SP), so it only
    has to agree within its own budget.
    """
    grad_ratio = r.grad_hidden_norm_ratio
    ratio = r.loss_ratio if r.loss_ref != 0 and math.isfinite(r.loss_ratio) else grad_ratio
    if (ratio is None or not (math.isfinite(ratio) and ratio > 0)
            or abs(ratio - 1.0) <= t.scale_loss_budgets * r.budget.loss_rel):
        return None
    if grad_ratio is not None and abs(grad_ratio - ratio) > (r.budget.grad_hidden_rel
                                                              + t.scale_gradient_slack * abs(ratio - 1.0)):
        return None  # loss and gradients moved differently: not one scale factor
    if r.grad_hidden_cosine is not None and r.grad_hidden_cosine < t.scale_cosine:
        return None
    return ratio


def _matches(ratio: float, expected: float, r: ParityReport, t: Thresholds) -> bool:
    """``ratio`` is the named factor ``expected``, to rounding."""
    return abs(ratio - expected) <= max(t.named_scale_loss_budgets * r.budget.loss_rel,
                                        t.scale_tolerance * abs(expected - 1.0), t.scale_floor)


def _scale_head(r: ParityReport, ratio: float) -> str:
    grad = (f", dL/dh norm ratio {r.grad_hidden_norm_ratio:.4f} (cosine {r.grad_hidden_cosine:.6f})"
            if r.grad_hidden_norm_ratio is not None else "")
    return f"loss ratio {ratio:.4f}{grad}"


def _divisor(r: ParityReport, sizes: Mapping[str, int], t: Thresholds, *, padding: bool) -> Diagnosis | None:
    """A scale that a token count the fused path may divide by explains (with or without the padding)."""
    ratio = _scale_factor(r, t)
    if ratio is None:
        return None
    for name, count, counts_padding in _alternative_divisors(r):
        if counts_padding != padding or count <= 0 or close(count, r.divisor, t.same_count):
            continue
        if not _matches(ratio, r.divisor / count, r, t):
            continue
        evidence = {**core_evidence(r), "scale": ratio, "fused_divisor": count, "contract_divisor": r.divisor}
        if padding:
            return Diagnosis.of("ignore_index_leak/padding_in_divisor", True,
                                f"{_scale_head(r, ratio)}: the fused path divides by {name} ({count:g}) where the"
                                f" contract says {_contract_divisor_words(r)} ({r.divisor:g}); padding is in the"
                                " denominator", evidence)
        return Diagnosis.of("normalization_owner/token_count", True,
                            f"{_scale_head(r, ratio)}{_k_note(r.divisor / count, sizes, t)}: the fused path divides"
                            f" by {name} ({count:g}) where the contract says {_contract_divisor_words(r)}"
                            f" ({r.divisor:g})", evidence)
    return None


def _alternative_divisors(r: ParityReport) -> list[tuple[str, float, bool]]:
    """Counts a fused path might divide by instead of the contract's: (words, count, counts padding?).

    The counts without padding come first: a divisor that both explain is a token count, not padding.
    """
    group = max(r.token_group_size, 1)
    return [
        ("this rank's non-ignored tokens", float(r.n_visible), False),
        ("this rank's own sequence shard's non-ignored tokens", float(r.n_visible_shard), False),
        ("the global non-ignored tokens", float(r.n_visible_global), False),
        ("the global non-ignored tokens over the group size", r.n_visible_global / group, False),
        ("all tokens including ignored ones", float(r.n_tokens), True),
    ]


def _contract_divisor_words(r: ParityReport) -> str:
    normalize = r.contract.get("normalize_by")
    if normalize == "given_count":
        return "the count given with the step (transformers' num_items_in_batch)"
    if normalize == "global_tokens":
        averaged = r.contract.get("grad_sync") == "average"
        return "global non-ignored tokens" + (" over the group size" if averaged else "")
    return "this rank's non-ignored tokens"


def _k_note(k: float, sizes: Mapping[str, int], t: Thresholds) -> str:
    rounded = round(k if k >= 1 else 1 / k)
    if rounded >= 2 and close(k if k >= 1 else 1 / k, rounded, t.scale_tolerance):
        matches = groups_of_size(rounded, sizes)
        return f", k = {rounded}" + (f" = {matches} size" if matches else "")
    return ""


def _fitted_scale(r: ParityReport, t: Thresholds) -> tuple[SignatureFit | None, float | None]:
    """The fit and the loss's factor kappa when the fit reads a significant factor on dL/dh that kappa, and nothing
    but rounding beside it, explains; (None, None) otherwise."""
    fit, kappa = r.signature, loss_factor(r)
    if fit is None or kappa is None or fit.sigmas("scale") < t.significant or not _scale_explains_fit(r, kappa, t):
        return None, None
    return fit, kappa


def _fit_clean_beside_scale(r: ParityReport, t: Thresholds, target: float = 0.0, shift: float = 0.0,
                            widen: float = 1.0) -> bool:
    """Besides the common factor only rounding is left: the residual within budget, and the target and shift
    directions no further from ``target`` and ``shift`` (zero: a path's own rounding) than rounding puts them (a
    bf16 target term carries up to one roundoff); ``widen`` scales the standard errors."""
    fit = r.signature
    return (fit.residual_rel <= r.budget.grad_hidden_rel
            and abs(fit.target - target) <= r.budget.grad_scale + widen * t.agreement_sigmas * fit.target_se
            and abs(fit.shift - shift) <= widen * t.significant * fit.shift_se)


def _scale_explains_fit(r: ParityReport, kappa: float, t: Thresholds) -> bool:
    """The loss's factor ``kappa`` and nothing but rounding explain the fit: its scale reads ``kappa`` and
    :func:`_fit_clean_beside_scale` holds.

    Either as read, or against a pure scale by ``kappa`` rounded as a bf16 path that weights tokens before
    rounding rounds it (the fit's ``pure_*``, see ``signature.py``): there the expected coefficients are that
    path's, and the two paths' independent rounding widens the tolerance by sqrt(2).
    """
    fit = r.signature
    expected = [(kappa, 0.0, 0.0, 1.0)]  # (scale, target, shift, widen)
    if fit.pure_scale is not None:
        expected.append((fit.pure_scale, fit.pure_target, fit.pure_shift, math.sqrt(2)))
    return any(abs(fit.scale - scale) <= widen * t.agreement_sigmas * fit.scale_se + r.budget.loss_rel
               and _fit_clean_beside_scale(r, t, target, shift, widen) for scale, target, shift, widen in expected)


def _gradient_factor(fit: SignatureFit, kappa: float) -> float:
    """dL/dh's factor as the fit reads it, less the offset a pure scale by ``kappa`` reads from its own rounding."""
    return fit.scale if fit.pure_scale is None else kappa + fit.scale - fit.pure_scale


def _rounded_reciprocal(r: ParityReport, kappa: float) -> tuple[str, float] | None:
    """The factor a mean gets from holding its 1/count in a 16-bit dtype, ``divisor * round(1/divisor) - 1``:
    the narrow dtype whose rounding the loss factor ``kappa`` is nearest to, or None when 1/count is exact in both."""
    if r.contract.get("reduction") != "mean" or r.divisor <= 0:
        return None
    options = [(name, r.divisor * float(torch.tensor(1.0 / r.divisor, dtype=torch.float64).to(dtype)) - 1.0)
               for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))]
    options = [(name, excess) for name, excess in options if excess != 0.0]
    return min(options, key=lambda option: abs(kappa - option[1])) if options else None


def output_transform(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """The reference under a mistaken form of the contract's own logit transform reproduces the seam (fitted by
    :func:`ce_guard.transform_fit.fit_output_transform` on checks over budget)."""
    fit = r.output_transform
    if fit is None or fit.mistake.startswith(("z_loss_over_", "l2_warp_")):  # a penalty's
        return None
    declared = r.contract.get("logit_multiplier", 1.0), r.contract.get("softcap")
    what = (f"logits multiplied by {fit.logit_multiplier:g} where the contract says {declared[0]:g}"
            if fit.mistake != "softcap_dropped" else f"logits not softcapped where the contract says {declared[1]:g}")
    return Diagnosis.of(f"output_transform/{fit.mistake}", True,
                        f"{headline(r)}: {what}; the reference under that transform matches the seam (loss rel err"
                        f" {fit.loss_rel_err:.2g}, dL/dh rel err {fit.grad_hidden_rel_err:.2g}): the head's output"
                        f" transform is {fit.mistake.replace('_', ' ')}",
                        {**core_evidence(r), "fitted_logit_multiplier": fit.logit_multiplier,
                         "fitted_softcap": fit.softcap})

