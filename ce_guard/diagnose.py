"""Turn a parity report into a named seam fault, with the numbers that point to it.

Each rule tests one signature from the fault catalogue (docs/faults.md) against the report, most
specific first: non-finite values, an empty check, each token's softmax alone rounded wider than the native
path's (a narrow accumulator whose errors cancel in every budget), padding in the gradient, a scale that one of the
token counts or a parallel group size explains, a loss offset that log(TP), z-loss or local-V smoothing
explains, a hidden gradient left unreduced (or reduced twice) over TP, errors piled on slice edges; then,
from the signature fit (ce_guard/signature.py), a factor loss and dL/dh share, or
rounding-sized factors they do not share; without a fit, a scale both gradients' norms carry; a constant
shift of dL/dz over the vocab slice (local-V smoothing the loss cannot show), a hidden gradient alone off
(rounded in a narrow running sum, or terms skipped), then precision drift. Nothing matched is said plainly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import torch

from ce_guard.parity import NARROW_SOFTMAX, ParityReport, margins

SCALE_COSINE = 0.999     # a pure scale leaves the gradient's direction intact
SCALE_TOLERANCE = 0.005  # relative tolerance on (expected - 1) for a named scale factor
OFFSET_TOLERANCE = 0.05  # relative tolerance on a named loss offset
SHIFT_SHARE = 0.5        # a constant dL/dz shift puts all its error in one common row; rounding 1/rows of it
ROUNDING_COUPLING = 1.6  # error-to-size coupling: skipped terms 1.0-1.2, a narrow running sum 2.3-3.7 (docs/faults.md #3)
SIGNIFICANT = 5.0        # standard errors a fitted coefficient must clear to be read as a fault's signature
NARROW_ROUNDING = 2.0 ** -7  # two bf16 unit roundoffs: the most a narrow accumulator's rounding moves a factor
# Standard errors by which a scale's per-token softmax spread must exceed a pure scale's to be a narrow dtype's. On
# the example model's hidden states scales read 0.93-1.03x (at most 0.3 of them), bf16 accumulators 1.41-2.28x
# (3.8-10): at 5 two of 17 fell short (docs/benchmarks.md, "Naming at the margin").
WIDER_SPREAD = 3.0


class Cause(str, Enum):
    WITHIN_BUDGET = "within_budget"
    NO_VISIBLE_TOKENS = "no_visible_tokens"
    NON_FINITE = "non_finite"
    NORMALIZATION_OWNER = "normalization_owner"
    NORMALIZATION_SCALE = "normalization_scale"
    IGNORE_INDEX_LEAK = "ignore_index_leak"
    LOG_TP_OFFSET = "log_tp_offset"
    Z_LOSS_BOUNDARY = "z_loss_boundary"
    LABEL_SMOOTHING_LOCAL_V = "label_smoothing_local_v"
    TARGET_MASKING = "target_masking"
    GRADIENT_APPROXIMATION = "gradient_approximation"
    ACCUMULATOR_DTYPE = "accumulator_dtype"
    TP_GRAD_REDUCTION = "tp_grad_reduction"
    UNEXPLAINED = "unexplained"


# The row of the fault catalogue (docs/faults.md) each cause belongs to.
FAULT_ROW = {
    Cause.NORMALIZATION_OWNER: 1, Cause.NORMALIZATION_SCALE: 2, Cause.ACCUMULATOR_DTYPE: 3,
    Cause.TARGET_MASKING: 4, Cause.IGNORE_INDEX_LEAK: 5, Cause.LABEL_SMOOTHING_LOCAL_V: 6,
    Cause.LOG_TP_OFFSET: 7, Cause.Z_LOSS_BOUNDARY: 8, Cause.GRADIENT_APPROXIMATION: 9, Cause.NON_FINITE: 10,
    Cause.TP_GRAD_REDUCTION: 11,
}


def catalogue_entry(cause: Cause) -> str | None:
    """Where the user's fault catalogue describes ``cause``, e.g. ``docs/faults.md#6-label_smoothing_local_v``."""
    row = FAULT_ROW.get(cause)
    return None if row is None else f"docs/faults.md#{row}-{cause.value}"


@dataclass(frozen=True)
class Diagnosis:
    """A named cause, whether it is drift, one sentence a person can act on, and the evidence.

    ``variant`` is ``"<cause>/<which signature>"`` (e.g. ``tp_grad_reduction/partial``): the machine-readable
    name of the rule that matched, for tests and dashboards to assert on instead of the prose.
    """

    cause: Cause
    drift: bool
    summary: str
    evidence: dict[str, float | int | str] = field(default_factory=dict)
    variant: str = ""

    def __post_init__(self) -> None:
        if not self.variant:
            object.__setattr__(self, "variant", self.cause.value)
        if self.variant.split("/")[0] != self.cause.value:
            raise ValueError(f"Diagnosis variant {self.variant!r} must start with its cause {self.cause.value!r}.")

    @classmethod
    def of(cls, variant: str, drift: bool, summary: str,
           evidence: dict[str, float | int | str] | None = None) -> "Diagnosis":
        """A diagnosis named by its variant; the cause is the variant's first part."""
        return cls(Cause(variant.split("/")[0]), drift, summary, dict(evidence or {}), variant)

    @property
    def fault_row(self) -> int | None:
        return FAULT_ROW.get(self.cause)

    @property
    def catalogue_entry(self) -> str | None:
        return catalogue_entry(self.cause)

    def to_dict(self) -> dict[str, object]:
        return {"cause": self.cause.value, "variant": self.variant, "drift": self.drift, "summary": self.summary,
                "fault_row": self.fault_row, "evidence": dict(self.evidence)}


def diagnose(report: ParityReport, *, group_sizes: Mapping[str, int] | None = None) -> Diagnosis:
    """Name the likely cause of the differences in ``report``.

    Args:
        report: the output of :func:`ce_guard.parity.compare`.
        group_sizes: sizes a scale factor k may be traced to, e.g. ``{"TP": 8, "SP": 8, "DP": 4,
            "grad_accum": 2}``. TP, and DP as the token group's size, are read from the report when absent.

    Example:
        >>> diagnose(report, group_sizes={"SP": 8}).summary
        'loss ratio 8.0000, dL/dh norm ratio 8.0000 (cosine 1.000000), k = 8 = SP size: ...'
    """
    sizes = dict(group_sizes or {})
    sizes.setdefault("TP", report.tp_size)
    sizes.setdefault("DP", report.token_group_size)
    for rule in (_non_finite, _empty, _within_budget, _narrow_softmax_alone, _ignored_rows, _named_scale, _offset,
                 _tp_grad_reduction, _target_masking, _fitted_scale, _fitted_rounding, _unnamed_scale,
                 _smoothing_shift, _gradient_only, _precision):
        found = rule(report, sizes)
        if found is not None:
            return found
    return Diagnosis.of("unexplained/no_signature", True,
                     "parity outside budget and no known signature matches: " + _headline(report),
                     _core_evidence(report))


def _non_finite(r: ParityReport, sizes) -> Diagnosis | None:
    bad = {k: v for k, v in r.nonfinite.items() if v}
    if not bad:
        return None
    where = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in bad.items())
    return Diagnosis.of("non_finite/values", True, f"non-finite values ({where}); not averaged away",
                     {f"nonfinite_{k}": v for k, v in bad.items()})


def _empty(r: ParityReport, sizes) -> Diagnosis | None:
    if r.n_visible_global > 0:
        return None
    leaked = abs(r.loss_fused) > 0 or bool(r.grad_hidden_norm_fused)
    if leaked:
        return Diagnosis.of("ignore_index_leak/all_ignored", True,
                         f"every target is ignore_index, yet the fused path returned loss {r.loss_fused:.6g} and"
                         f" dL/dh norm {r.grad_hidden_norm_fused or 0.0:.6g}: padding reaches the loss",
                         _core_evidence(r))
    return Diagnosis.of("no_visible_tokens/empty", False, "no visible tokens in this check: nothing to compare",
                     {"n_tokens": r.n_tokens})


def _within_budget(r: ParityReport, sizes) -> Diagnosis | None:
    if not r.within_budget:
        return None
    return Diagnosis.of("within_budget/clean", False, "within budget: " + _headline(r), _core_evidence(r))


def _narrow_softmax_alone(r: ParityReport, sizes) -> Diagnosis | None:
    """Loss and gradients within budget, but each token's softmax off by its own factor, wider than native.

    A running max, sum-exp or lse kept in bf16 rounds each token's lse by its own amount: unbiased, so it cancels
    in the mean loss and spreads over the gradients' norm within their budget. Only the per-token spread shows it.
    """
    m, fit = margins(r), r.signature
    if (m["softmax"] or 0.0) <= 1.0 or any((m[k] or 0.0) > 1.0 for k in ("loss", "grad_hidden", "grad_weight")):
        return None
    if r.per_token_max_abs_diff is not None and r.per_token_max_abs_diff > r.budget.per_token_abs:
        return None
    against = "the native path" if fit.pure_scale is None else "a pure scale"
    return Diagnosis.of("accumulator_dtype/narrow_softmax", True,
                     f"each token's softmax is off by its own factor: their spread is {fit.softmax_spread:.2f}x"
                     f" {against}'s ({fit.spread_sigmas():.0f} sigma on {fit.tokens} tokens, rms"
                     f" {fit.softmax_excess:.1e} beyond it), while loss and gradients are within budget (margins"
                     f" {m['loss']:.2f}, {m['grad_hidden'] or 0.0:.2f}, {m['grad_weight'] or 0.0:.2f}): each token's"
                     " rounding cancels in the mean; the softmax's statistics (running max, sum-exp, lse) are held in a"
                     " narrower dtype than the contract declares",
                     {**_core_evidence(r), **_fit_evidence(fit)})


def _ignored_rows(r: ParityReport, sizes) -> Diagnosis | None:
    if r.grad_hidden_ignored_norm is None or not r.grad_hidden_norm_ref:
        return None
    if r.grad_hidden_ignored_norm <= r.budget.grad_hidden_rel * r.grad_hidden_norm_ref:
        return None
    return Diagnosis.of("ignore_index_leak/ignored_rows", True,
                     f"dL/dh is non-zero on ignored tokens (norm {r.grad_hidden_ignored_norm:.4g}, reference 0):"
                     " padding targets are gathered as real classes",
                     {**_core_evidence(r), "grad_hidden_ignored_norm": r.grad_hidden_ignored_norm})


def _scale_factor(r: ParityReport) -> float | None:
    """The factor loss and dL/dh share, if they share one; None when there is no scale beyond rounding.

    The loss carries this rank's divisor exactly; dL/dh can mix several ranks' divisors (SP), so it only
    has to agree within its own budget.
    """
    grad_ratio = r.grad_hidden_norm_ratio
    ratio = r.loss_ratio if r.loss_ref != 0 and math.isfinite(r.loss_ratio) else grad_ratio
    if ratio is None or not (math.isfinite(ratio) and ratio > 0) or abs(ratio - 1.0) <= 2 * r.budget.loss_rel:
        return None
    if grad_ratio is not None and abs(grad_ratio - ratio) > r.budget.grad_hidden_rel + 0.1 * abs(ratio - 1.0):
        return None  # loss and gradients moved differently: not one scale factor
    if r.grad_hidden_cosine is not None and r.grad_hidden_cosine < SCALE_COSINE:
        return None
    return ratio


def _scale_head(r: ParityReport, ratio: float) -> str:
    grad = (f", dL/dh norm ratio {r.grad_hidden_norm_ratio:.4f} (cosine {r.grad_hidden_cosine:.6f})"
            if r.grad_hidden_norm_ratio is not None else "")
    return f"loss ratio {ratio:.4f}{grad}"


def _named_scale(r: ParityReport, sizes) -> Diagnosis | None:
    """A scale that one of the token counts, or an integer parallel/accumulation size, explains."""
    ratio = _scale_factor(r)
    if ratio is None:
        return None
    evidence = {**_core_evidence(r), "scale": ratio}
    head = _scale_head(r, ratio)

    def matches(expected: float) -> bool:
        return abs(ratio - expected) <= max(4 * r.budget.loss_rel, SCALE_TOLERANCE * abs(expected - 1.0), 1e-6)

    for name, count, padding in _alternative_divisors(r):
        if count > 0 and not _close(count, r.divisor, 1e-9) and matches(r.divisor / count):
            evidence.update(fused_divisor=count, contract_divisor=r.divisor)
            if padding:
                return Diagnosis.of("ignore_index_leak/padding_in_divisor", True,
                                 f"{head}: the fused path divides by {name} ({count:g}) where the contract says"
                                 f" {_contract_divisor_words(r)} ({r.divisor:g}); padding is in the denominator",
                                 evidence)
            return Diagnosis.of("normalization_owner/token_count", True,
                             f"{head}{_k_note(r.divisor / count, sizes)}: the fused path divides by {name}"
                             f" ({count:g}) where the contract says {_contract_divisor_words(r)} ({r.divisor:g})",
                             evidence)

    k = round(ratio) if ratio >= 1 else round(1 / ratio)
    if k >= 2 and matches(k if ratio >= 1 else 1 / k):
        group = _groups_of_size(k, sizes)
        owner = (f"k = {k} = {group} size" if group else f"k = {k} matches no parallel group or"
                 f" accumulation size ({', '.join(f'{n}={s}' for n, s in sizes.items())})")
        evidence.update(k=k)
        return Diagnosis.of("normalization_scale/integer_k", True,
                         f"{head}, {owner}: loss and gradients are {k}x {'too large' if ratio > 1 else 'too small'};"
                         f" a divide by the {group or 'group'} size (or by the accumulation steps) is missing or doubled",
                         evidence)
    return None


def _unnamed_scale(r: ParityReport, sizes) -> Diagnosis | None:
    """A pure scale that no count explains: only when the gradients visibly carry the loss's factor too.

    Rounding can bias a gradient's norm ratio by up to ``budget.grad_scale`` (less than the per-element
    budget), so each gradient's ratio must sit farther than that from 1 and nearer than that to the loss
    ratio, with only rounding left after the scale.
    """
    ratio = _scale_factor(r)
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
    residual = r.grad_hidden_scaled_residual
    return Diagnosis.of("normalization_scale/norm_factor", True,
                     f"{_scale_head(r, ratio)}: loss and gradients are {ratio:.4g}x"
                     f" {'too large' if ratio > 1 else 'too small'}, a pure scale (dL/dh residual after it"
                     f" {residual:.2g}) that no token count or group size explains: the loss is divided by"
                     " another count than the contract's", {**_core_evidence(r), "scale": ratio})


def _loss_factor(r: ParityReport) -> float | None:
    """``loss_ratio - 1`` when the loss is over its budget and the ratio is defined; else None."""
    if r.loss_rel_err <= r.budget.loss_rel or r.loss_ref == 0 or not math.isfinite(r.loss_ratio):
        return None
    return r.loss_ratio - 1.0


def _fit_clean_beside_scale(r: ParityReport, target: float = 0.0, shift: float = 0.0, widen: float = 1.0) -> bool:
    """Besides the common factor only rounding is left: the residual within budget, and the target and shift
    directions no further from ``target`` and ``shift`` (zero: a path's own rounding) than rounding puts them (a
    bf16 target term carries up to one roundoff); ``widen`` scales the standard errors."""
    fit = r.signature
    return (fit.residual_rel <= r.budget.grad_hidden_rel
            and abs(fit.target - target) <= r.budget.grad_scale + widen * 3 * fit.target_se
            and abs(fit.shift - shift) <= widen * SIGNIFICANT * fit.shift_se)


def _scale_explains_fit(r: ParityReport, kappa: float) -> bool:
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
    return any(abs(fit.scale - scale) <= widen * 3 * fit.scale_se + r.budget.loss_rel
               and _fit_clean_beside_scale(r, target, shift, widen) for scale, target, shift, widen in expected)


def _gradient_factor(fit, kappa: float) -> float:
    """dL/dh's factor as the fit reads it, less the offset a pure scale by ``kappa`` reads from its own rounding."""
    return fit.scale if fit.pure_scale is None else kappa + fit.scale - fit.pure_scale


def _fitted_scale(r: ParityReport, sizes) -> Diagnosis | None:
    """Loss and dL/dh carry one factor that no count explains, read from the fit to dL/dh's own direction.

    The norm ratio cannot resolve a factor under one roundoff of the gradients' dtype (bf16: 0.39%); its
    projection on the reference gradient can, to the fit's standard error. A narrow accumulator carries
    such a factor too (the mean's 1/count rounded), and tells itself apart by what a scale lacks: each
    token's softmax off by its own factor (its rounded lse), wider than the native path's rounding.
    """
    fit, kappa = r.signature, _loss_factor(r)
    if fit is None or kappa is None or fit.sigmas("scale") < SIGNIFICANT:
        return None
    if not _scale_explains_fit(r, kappa):
        return None
    if fit.spread_sigmas() >= WIDER_SPREAD and fit.softmax_excess >= NARROW_SOFTMAX:
        return Diagnosis.of("accumulator_dtype/narrow_softmax_and_scale", True,
                         f"loss {r.loss_ratio:.5f}x and dL/dh {1 + fit.scale:.5f}x ({fit.sigmas('scale'):.0f} sigma, fitted"
                         f" on {fit.tokens} tokens), and each token's softmax is off by its own factor: their spread is"
                         f" {fit.softmax_spread:.2f}x {'the native path' if fit.pure_scale is None else 'a pure scale'}'s"
                         f" ({fit.spread_sigmas():.0f} sigma, rms {fit.softmax_excess:.1e} beyond it): the softmax's"
                         " statistics (running max, sum-exp, lse) and the mean's 1/count are held in a narrower dtype than"
                         " the contract declares",
                         {**_core_evidence(r), "scale": r.loss_ratio, **_fit_evidence(fit)})
    rounded = _rounded_reciprocal(r, kappa)
    if rounded is not None and abs(kappa - rounded[1]) < abs(kappa - _gradient_factor(fit, kappa)):
        dtype, excess = rounded
        return Diagnosis.of("accumulator_dtype/rounded_reciprocal", True,
                         f"loss {r.loss_ratio:.5f}x and dL/dh {1 + fit.scale:.5f}x ({fit.sigmas('scale'):.0f} sigma, fitted"
                         f" on {fit.tokens} tokens): the loss's factor is nearer {1 + excess:.5f}x, which is 1/{r.divisor:g}"
                         f" rounded to {dtype}, than the gradients' own: the mean's 1/count is held in {dtype} (a scale"
                         " of exactly that size would read the same)",
                         {**_core_evidence(r), "scale": r.loss_ratio, "rounded_reciprocal_excess": excess,
                          **_fit_evidence(fit)})
    return Diagnosis.of("normalization_scale/fitted_factor", True,
                     f"loss {r.loss_ratio:.5f}x and dL/dh {1 + fit.scale:.5f}x ({fit.sigmas('scale'):.0f} sigma,"
                     f" fitted on {fit.tokens} tokens), nothing but rounding beside it: loss and gradients are"
                     f" {r.loss_ratio:.4g}x {'too large' if kappa > 0 else 'too small'}, a factor no token count or"
                     " group size explains: the loss is divided by another count than the contract's",
                     {**_core_evidence(r), "scale": r.loss_ratio, **_fit_evidence(fit)})


def _fitted_rounding(r: ParityReport, sizes) -> Diagnosis | None:
    """Loss and dL/dh off by *different* factors, each no larger than a narrow dtype's rounding.

    A running max, sum-exp or loss total kept in bf16, or the mean's 1/count rounded to bf16, moves the
    loss by its own rounding and the gradients by another (or not at all); a scale moves both alike, which
    :func:`_fitted_scale` has already ruled out.
    """
    fit, kappa = r.signature, _loss_factor(r)
    if fit is None or kappa is None or abs(kappa) > NARROW_ROUNDING or abs(fit.scale) > NARROW_ROUNDING:
        return None
    if not _fit_clean_beside_scale(r):
        return None
    grads = (f"dL/dh carries {1 + fit.scale:.5f}x ({fit.sigmas('scale'):.0f} sigma)"
             if fit.sigmas("scale") >= SIGNIFICANT else f"dL/dh carries no factor ({fit.scale:+.1e} +- {fit.scale_se:.1e})")
    return Diagnosis.of("accumulator_dtype/different_factors", True,
                     f"loss {r.loss_ratio:.5f}x ({r.loss_rel_err / r.budget.loss_rel:.1f}x its budget) while {grads},"
                     f" fitted on {fit.tokens} tokens: loss and gradients are off by different factors, each within"
                     f" two bf16 roundoffs ({NARROW_ROUNDING:.2%}): a running max, sum-exp, loss total or the mean's"
                     " 1/count is kept in a narrower dtype than the contract declares",
                     {**_core_evidence(r), **_fit_evidence(fit)})


def _rounded_reciprocal(r: ParityReport, kappa: float) -> tuple[str, float] | None:
    """The factor a mean gets from holding its 1/count in a 16-bit dtype, ``divisor * round(1/divisor) - 1``:
    the narrow dtype whose rounding the loss factor ``kappa`` is nearest to, or None when 1/count is exact in both."""
    if r.contract.get("reduction") != "mean" or r.divisor <= 0:
        return None
    options = [(name, r.divisor * float(torch.tensor(1.0 / r.divisor, dtype=torch.float64).to(dtype)) - 1.0)
               for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16))]
    options = [(name, excess) for name, excess in options if excess != 0.0]
    return min(options, key=lambda option: abs(kappa - option[1])) if options else None


def _fit_evidence(fit) -> dict[str, float | int]:
    return {"fit_tokens": fit.tokens, "fit_scale": fit.scale, "fit_scale_se": fit.scale_se,
            "fit_target": fit.target, "fit_target_se": fit.target_se, "fit_shift": fit.shift,
            "fit_shift_se": fit.shift_se, "fit_residual_rel": fit.residual_rel,
            "fit_softmax_spread": fit.softmax_spread, "fit_softmax_spread_se": fit.softmax_spread_se,
            "fit_softmax_excess": fit.softmax_excess,
            **({} if fit.pure_scale is None else {"fit_pure_scale": fit.pure_scale, "fit_pure_target": fit.pure_target,
                                                  "fit_pure_shift": fit.pure_shift})}


def _offset(r: ParityReport, sizes) -> Diagnosis | None:
    offset = r.loss_offset_per_token
    if abs(offset) <= r.budget.loss_rel * max(abs(r.loss_ref), 1e-12):
        return None
    evidence = {**_core_evidence(r), "loss_offset_per_token": offset}
    contract = r.contract
    for name, size in sizes.items():
        if size > 1 and _close(offset, math.log(size), OFFSET_TOLERANCE):
            return Diagnosis.of("log_tp_offset/denominator_twice", True,
                             f"loss higher by {offset:.5f} per token = log({size}) = log({name}):"
                             " the denominator was summed over the group twice (logits gathered, then reduced again)",
                             evidence)
    z = contract.get("z_loss", 0.0) or 0.0
    if z and abs(offset) > 0 and _close(abs(offset), z * r.mean_lse_sq, OFFSET_TOLERANCE):
        how = "missing from" if offset < 0 else "applied twice in"
        return Diagnosis.of(f"z_loss_boundary/{'missing' if offset < 0 else 'doubled'}", True,
                         f"loss offset {offset:.6g} per token = {'-' if offset < 0 else '+'}z * mean(lse^2)"
                         f" = {z:g} * {r.mean_lse_sq:.4g}: z-loss is {how} the fused path", evidence)
    eps = contract.get("label_smoothing", 0.0) or 0.0
    if eps and (_close(offset, r.smoothing_local_offset, OFFSET_TOLERANCE) or r.fused_loss_tp_spread > abs(offset) / 2):
        return Diagnosis.of("label_smoothing_local_v/loss_offset", True,
                         f"loss offset {offset:.6g} per token (local-V smoothing predicts"
                         f" {r.smoothing_local_offset:.6g}); fused loss differs across TP ranks by"
                         f" {r.fused_loss_tp_spread:.3g}: label smoothing uses the local vocab slice",
                         {**evidence, "smoothing_local_offset": r.smoothing_local_offset,
                          "fused_loss_tp_spread": r.fused_loss_tp_spread})
    return None


def _tp_grad_reduction(r: ParityReport, sizes) -> Diagnosis | None:
    """Loss exact, dL/dh off because the vocab-parallel backward's all-reduce over TP is missing or doubled.

    Each rank's slice contributes a partial dL/dh; the copy-to-TP-region op sums them. Missing, the ranks'
    fused gradients sum to the reference; done twice, each is exactly TP times it.
    """
    if r.tp_size < 2 or r.grad_hidden_rel_err is None or r.loss_rel_err > r.budget.loss_rel:
        return None
    evidence = {**_core_evidence(r), "tp_size": r.tp_size}
    summed = r.grad_hidden_tp_sum_rel_err
    if summed is not None and summed <= r.budget.grad_hidden_rel:
        return Diagnosis.of("tp_grad_reduction/partial", True,
                         f"loss exact but dL/dh norm ratio {r.grad_hidden_norm_ratio:.4f} (cosine"
                         f" {r.grad_hidden_cosine:.4f}), and the TP={r.tp_size} ranks' dL/dh summed matches the"
                         f" reference (rel err {summed:.3g}, budget {r.budget.grad_hidden_rel:.3g}): each rank returns"
                         " only its vocab slice's partial dL/dh; the all-reduce over TP of the output layer's input"
                         " gradient (copy-to-TP-region backward) is missing",
                         {**evidence, "grad_hidden_tp_sum_rel_err": summed})
    ratio, cosine = r.grad_hidden_norm_ratio, r.grad_hidden_cosine
    if (ratio is not None and cosine is not None and cosine >= SCALE_COSINE
            and abs(ratio - r.tp_size) <= max(4 * r.budget.grad_scale * r.tp_size, 1e-6)):
        return Diagnosis.of("tp_grad_reduction/doubled", True,
                         f"loss exact but dL/dh norm ratio {ratio:.4f} = TP = {r.tp_size} (cosine {cosine:.6f}):"
                         " the hidden gradient is all-reduced over TP twice (once in the loss, once in the"
                         " output layer's copy-to-TP-region backward)", evidence)
    return None


def _target_masking(r: ParityReport, sizes) -> Diagnosis | None:
    if r.tp_size < 2:
        return None
    edge = r.grad_weight_edge_row_share or 0.0
    boundary = r.grad_hidden_boundary_share or 0.0
    on_edges = edge >= 0.5
    on_boundary = boundary >= 0.5 and r.boundary_token_fraction < 0.25
    if not (on_edges or on_boundary):
        return None
    contract = r.contract
    return Diagnosis.of("target_masking/slice_edges", True,
                     f"errors sit on the vocab slice's edges (dL/dW edge rows hold {edge:.0%} of the error,"
                     f" boundary-target tokens {boundary:.0%} of the dL/dh error from {r.boundary_token_fraction:.1%}"
                     f" of tokens) at TP={r.tp_size}, slice [{contract.get('vocab_start')}, {contract.get('vocab_end')}):"
                     " targets outside this partition are clipped or masked off by one before the gather",
                     {**_core_evidence(r), "grad_weight_edge_row_share": edge, "grad_hidden_boundary_share": boundary,
                      "boundary_token_fraction": r.boundary_token_fraction})


def _smoothing_shift(r: ParityReport, sizes) -> Diagnosis | None:
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
    if not off or any(share < SHIFT_SHARE for _, share in off):
        return None
    shares = ", ".join(f"{name} {share:.1%}" for name, share in off)
    return Diagnosis.of("label_smoothing_local_v/gradient_shift", True,
                     f"the gradient error is one constant shift of dL/dz over this vocab slice ({shares} of"
                     f" it in a common row) at TP={r.tp_size}, label smoothing {eps:g}, loss offset"
                     f" {r.loss_offset_per_token:.3g} per token (local-V smoothing predicts"
                     f" {r.smoothing_local_offset:.3g}): label smoothing's uniform term uses the local vocab slice",
                     {**_core_evidence(r), "loss_offset_per_token": r.loss_offset_per_token,
                      "smoothing_local_offset": r.smoothing_local_offset,
                      **{f"shift_share_{name}": share for name, share in off}})


def _gradient_only(r: ParityReport, sizes) -> Diagnosis | None:
    """Loss exact, dL/dh off, and not by a scale: a backward that rounds its running sum, or one that skips terms.

    Both leave the gradient a little short. They differ in how the error relates to each element: a sum over
    vocab blocks kept in bf16 rounds every element relative to its own size (coupling 2-4), while skipped
    small-probability terms leave an error that ignores the element's size (coupling about 1).
    """
    excess = _excess(r)
    if (r.grad_hidden_rel_err is None or excess["dL/dh"] <= 1.0 or excess["loss"] > 1.0
            or (r.grad_hidden_cosine or 0.0) < 0.9 or (r.grad_hidden_scaled_residual or 0.0) <= r.budget.grad_hidden_rel):
        return None
    coupling = r.grad_hidden_magnitude_coupling or 0.0
    if coupling >= ROUNDING_COUPLING and excess["dL/dW"] > excess["dL/dh"]:
        return None  # rounding worst on dL/dW: the general accumulator signature, _precision's
    ratio = r.grad_hidden_norm_ratio
    head = (f"loss exact ({excess['loss']:.2f}x budget) but dL/dh error {r.grad_hidden_rel_err:.3g} is"
            f" {excess['dL/dh']:.1f}x budget, norm ratio {ratio:.4f}"
            f" ({'short' if ratio < 1 else 'long'}), error-to-size coupling {coupling:.2f}")
    evidence = {**_core_evidence(r), **{f"excess_{k}": v for k, v in excess.items()},
                "grad_hidden_magnitude_coupling": coupling}
    if coupling >= ROUNDING_COUPLING:
        return Diagnosis.of("accumulator_dtype/hidden_gradient_sum", True,
                         f"{head} (each element rounded relative to its own size; skipped terms give ~1): the hidden"
                         " gradient carries a narrower dtype's rounding than the inputs': its sum over vocab blocks, or"
                         " the logit gradient itself, is kept in bf16 or the input dtype",
                         evidence)
    return Diagnosis.of("gradient_approximation/skipped_terms", True,
                     f"{head} (the error ignores each element's size; a narrow running sum gives 2-4): the backward"
                     " skips small terms (e.g. a gradient filter on small-probability blocks)", evidence)


def _excess(r: ParityReport) -> dict[str, float]:
    """Error / budget of loss, dL/dh and dL/dW (the logged margins); 0 for a gradient not compared."""
    m = margins(r)
    return {"loss": m["loss"], "dL/dh": m["grad_hidden"] or 0.0, "dL/dW": m["grad_weight"] or 0.0}


def _precision(r: ParityReport, sizes) -> Diagnosis | None:
    excess = _excess(r)
    ratio = r.grad_hidden_norm_ratio or 1.0
    if abs(ratio - 1.0) > 0.05 or (r.grad_hidden_cosine is not None and r.grad_hidden_cosine < 0.9):
        return None
    evidence = {**_core_evidence(r), **{f"excess_{k}": v for k, v in excess.items()}}
    worst = max(excess, key=excess.get)
    if excess["dL/dh"] <= 1.0 and excess["dL/dW"] <= 1.0:
        return Diagnosis.of("unexplained/loss_only", True,
                         f"only the loss is off ({r.loss_ratio:.5f}x, {excess['loss']:.1f}x its budget) while dL/dh"
                         " and dL/dW are within budget: a scale, penalty or reduced-precision accumulator too small"
                         " for the gradients to resolve at this dtype; watch whether it grows", evidence)
    if excess["loss"] <= 1.0 and worst == "dL/dh":
        return None  # the hidden gradient off in no way _gradient_only knows: unexplained
    return Diagnosis.of("accumulator_dtype/precision", True,
                     f"scale ratio {ratio:.4f}, cosine {r.grad_hidden_cosine if r.grad_hidden_cosine is not None else 1:.6f},"
                     f" errors above budget (loss {excess['loss']:.1f}x, dL/dh {excess['dL/dh']:.1f}x,"
                     f" dL/dW {excess['dL/dW']:.1f}x), worst on {worst}: accumulators (running max, denominator or"
                     " weight gradient) are kept in a narrower dtype than the contract declares", evidence)


def _alternative_divisors(r: ParityReport) -> list[tuple[str, float, bool]]:
    """Counts a fused path might divide by instead of the contract's: (words, count, counts padding?)."""
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
    if normalize == "global_tokens":
        return "global non-ignored tokens" + (" over the group size" if r.contract.get("grad_sync") == "average" else "")
    return "this rank's non-ignored tokens"


def _k_note(k: float, sizes: Mapping[str, int]) -> str:
    rounded = round(k if k >= 1 else 1 / k)
    if rounded >= 2 and _close(k if k >= 1 else 1 / k, rounded, SCALE_TOLERANCE):
        matches = _groups_of_size(rounded, sizes)
        return f", k = {rounded}" + (f" = {matches} size" if matches else "")
    return ""


def _groups_of_size(k: int, sizes: Mapping[str, int]) -> str:
    return " = ".join(name for name, size in sizes.items() if size == k)


def _headline(r: ParityReport) -> str:
    parts = [f"loss rel err {r.loss_rel_err:.3g} (budget {r.budget.loss_rel:.3g})"]
    if r.grad_hidden_rel_err is not None:
        parts.append(f"dL/dh rel err {r.grad_hidden_rel_err:.3g} (budget {r.budget.grad_hidden_rel:.3g},"
                     f" norm ratio {r.grad_hidden_norm_ratio:.4f})")
    if r.grad_weight_rel_err is not None:
        parts.append(f"dL/dW rel err {r.grad_weight_rel_err:.3g} (budget {r.budget.grad_weight_rel:.3g})")
    return ", ".join(parts)


def _core_evidence(r: ParityReport) -> dict[str, float | int]:
    evidence = {"loss_fused": r.loss_fused, "loss_ref": r.loss_ref, "loss_rel_err": r.loss_rel_err,
                "n_visible": r.n_visible, "n_visible_global": r.n_visible_global, "divisor": r.divisor}
    for key in ("grad_hidden_norm_ratio", "grad_hidden_cosine", "grad_hidden_rel_err", "grad_weight_rel_err"):
        value = getattr(r, key)
        if value is not None:
            evidence[key] = value
    return evidence


def _close(a: float, b: float, rel: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= rel * max(abs(b), 1e-12)
