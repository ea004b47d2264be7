"""The diagnosis as one ordered table: each rule tests one signature of the fault catalogue (docs/faults.md).

The first rule that matches names the cause. A rule's ``after`` names the rules that must be tried before it: those
whose not matching its matcher takes for granted (``empty`` assumes the batch leaked nothing, ``loss_only`` that the
check is over budget), and those seen matching the same report and winning it on the golden corpus
(tests/assets/diagnoses.jsonl). tests/test_rules.py holds the order to every ``after``;
tests/test_diagnosis_golden.py holds every winner of the corpus to the ``after`` of the rules it beat. Nothing
matched is said plainly: ``unexplained/no_signature``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ce_guard.diagnosis import gradients, mutation, offsets, outcomes, scales, training, upstream
from ce_guard.diagnosis.causes import Cause, Diagnosis, catalogue_entry
from ce_guard.diagnosis.signals import core_evidence, headline
from ce_guard.diagnosis.thresholds import Thresholds
from ce_guard.diagnosis.verdict import DEFAULT

if TYPE_CHECKING:
    from ce_guard.parity import ParityReport

Matcher = Callable[["ParityReport", Mapping[str, int], Thresholds], "Diagnosis | None"]

# Signals several rules read: the verdict's (over_budget), a shared scale's, the token counts a divisor may be, the
# fit's, a loss offset's, a hidden gradient off alone, the training loop's weight, and a gradient kept to rounding.
VERDICT = ("nonfinite", "loss_rel_err", "per_token_max_abs_diff", "grad_hidden_rel_err", "grad_weight_rel_err",
           "signature", "budget")
SCALE = ("loss_ratio", "loss_ref", "grad_hidden_norm_ratio", "grad_hidden_cosine", "budget")
DIVISORS = (*SCALE, "n_visible", "n_visible_shard", "n_visible_global", "n_tokens", "token_group_size", "divisor",
            "contract")
FIT = ("signature", "loss_rel_err", "loss_ratio", "loss_ref", "budget")
OFFSET = ("loss_offset_per_token", "loss_ref", "budget")
HIDDEN_ALONE = ("loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err", "grad_hidden_cosine",
                "grad_hidden_scaled_residual", "grad_hidden_magnitude_coupling", "grad_hidden_norm_ratio", "budget")
STEP = ("step_weight",)
ROUNDING_SIZED = ("grad_hidden_norm_ratio", "grad_hidden_cosine", "loss_rel_err", "grad_hidden_rel_err",
                  "grad_weight_rel_err", "loss_ratio", "budget")
# The per-token upstream weights dL/dh carries (reduction='none'), read where dL/dh is over budget.
UPSTREAM = ("upstream_fit", "loss_rel_err", "grad_hidden_rel_err", "grad_weight_rel_err", "budget")


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One signature: the variants it names, the report fields it decides on, and the rules tried before it."""

    name: str
    variants: tuple[str, ...]  # "<cause>/<signature>", one cause per rule
    signals: tuple[str, ...]  # ParityReport fields the matcher reads, besides the core evidence every rule reports
    match: Matcher
    after: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        causes = {variant.split("/")[0] for variant in self.variants}
        if len(causes) != 1:
            raise ValueError(f"Rule {self.name!r} names variants of {sorted(causes)}; expected one cause per rule."
                             " Split it into one rule per cause.")

    @property
    def cause(self) -> Cause:
        return Cause(self.variants[0].split("/")[0])

    @property
    def anchor(self) -> str | None:
        """The catalogue entry of the rule's cause, e.g. ``docs/faults.md#3-accumulator_dtype``."""
        return catalogue_entry(self.cause)


RULES: tuple[Rule, ...] = (
    # A loss path that wrote into its inputs: into the hidden states or the weight (the comparison itself is void),
    # or into the logits while the numbers are within budget (where they drift, their own rule names it).
    Rule(name="input_mutation", variants=("input_mutation/seam_inputs", "input_mutation/logits"),
         signals=(*VERDICT, "mutated_inputs"), match=mutation.input_mutation),
    Rule(name="non_finite", variants=("non_finite/values",), signals=("nonfinite",), match=outcomes.non_finite),
    Rule(name="all_ignored", variants=("ignore_index_leak/all_ignored",),
         signals=("n_visible_global", "loss_fused", "grad_hidden_norm_fused", "contract"), match=outcomes.all_ignored,
         after=("non_finite",)),
    Rule(name="empty", variants=("no_visible_tokens/empty",), signals=("n_visible_global", "n_tokens", "contract"),
         match=outcomes.empty, after=("all_ignored",)),
    # The training loop's weight, before "clean": a seam that computes its loss right can reach the optimizer wrong.
    # A loss term beside the seam (an MTP depth) first: its own two signatures need its counts.
    Rule(name="mtp_main_count", variants=("window_weighting/mtp_main_count",), signals=STEP,
         match=training.mtp_main_count, after=("empty",)),
    Rule(name="mtp_local_count", variants=("window_weighting/mtp_local_count",), signals=STEP,
         match=training.mtp_local_count, after=("mtp_main_count",)),
    Rule(name="partial_window", variants=("window_weighting/partial_window",), signals=STEP,
         match=training.partial_window, after=("empty",)),
    Rule(name="micro_batch_mean", variants=("window_weighting/micro_batch_mean",), signals=STEP,
         match=training.micro_batch_mean, after=("partial_window",)),
    Rule(name="local_tokens", variants=("window_weighting/local_tokens",), signals=STEP,
         match=training.local_tokens, after=("micro_batch_mean",)),
    Rule(name="loss_scaled_outside", variants=("loss_scaled_outside/accumulation", "loss_scaled_outside/world_size",
                                               "loss_scaled_outside/factor"),
         signals=STEP, match=training.loss_scaled_outside, after=("local_tokens",)),
    Rule(name="clean", variants=("within_budget/clean",), signals=VERDICT, match=outcomes.clean,
         after=("loss_scaled_outside",)),
    Rule(name="narrow_softmax", variants=("accumulator_dtype/narrow_softmax",), signals=VERDICT,
         match=outcomes.narrow_softmax),
    # A z-loss over every row (or an L2-warp, on every row) puts a gradient on ignored rows, as a leak does: the
    # fitted row set is tried first.
    Rule(name="penalty_normalization", variants=("penalty_normalization/z_loss_over_all",
                                                 "penalty_normalization/z_loss_over_counted",
                                                 "penalty_normalization/l2_warp_over_all",
                                                 "penalty_normalization/l2_warp_over_counted"),
         signals=("output_transform", "contract"), match=offsets.penalty_normalization, after=("clean",)),
    # fla's l2_warp backward that drops grad_output: only the penalty's share of dL/dh is off the upstream.
    Rule(name="l2_warp_upstream", variants=("backward_scale/l2_warp_upstream_ignored",),
         signals=("output_transform", "contract"), match=offsets.l2_warp_upstream, after=("clean",)),
    Rule(name="ignored_rows", variants=("ignore_index_leak/ignored_rows",),
         signals=("grad_hidden_ignored_norm", "grad_hidden_norm_ref", "loss_rel_err", "budget", "contract"),
         match=outcomes.ignored_rows,
         after=("non_finite", "penalty_normalization", "l2_warp_upstream")),
    # Per-token upstream weights (reduction='none'): one token's weight for all, or the weights in another order.
    Rule(name="upstream_first_token", variants=("upstream_broadcast/first_token",), signals=UPSTREAM,
         match=upstream.first_token, after=("clean",)),
    Rule(name="upstream_order", variants=("upstream_order/transposed", "upstream_order/permuted"), signals=UPSTREAM,
         match=upstream.order, after=("clean",)),
    Rule(name="output_transform", variants=("output_transform/dropped", "output_transform/doubled",
                                            "output_transform/inverted", "output_transform/softcap_dropped"),
         signals=("output_transform", "contract"), match=scales.output_transform, after=("clean",)),
    Rule(name="token_count", variants=("normalization_owner/token_count",), signals=DIVISORS,
         match=scales.token_count),
    Rule(name="padding_in_divisor", variants=("ignore_index_leak/padding_in_divisor",), signals=DIVISORS,
         match=scales.padding_in_divisor, after=("token_count",)),
    Rule(name="integer_k", variants=("normalization_scale/integer_k",), signals=SCALE, match=scales.integer_k,
         after=("padding_in_divisor",)),
    Rule(name="denominator_twice", variants=("log_tp_offset/denominator_twice",), signals=OFFSET,
         match=offsets.denominator_twice),
    Rule(name="z_loss", variants=("z_loss_boundary/missing", "z_loss_boundary/doubled"),
         signals=(*OFFSET, "loss_fused", "mean_lse_sq", "n_tokens", "contract"), match=offsets.z_loss),
    Rule(name="smoothing_offset", variants=("label_smoothing_local_v/loss_offset",),
         signals=(*OFFSET, "smoothing_local_offset", "fused_loss_tp_spread", "contract"),
         match=offsets.smoothing_offset),
    Rule(name="tp_grad_reduction", variants=("tp_grad_reduction/partial", "tp_grad_reduction/doubled"),
         signals=("tp_size", "loss_rel_err", "grad_hidden_rel_err", "grad_hidden_tp_sum_rel_err",
                  "grad_hidden_norm_ratio", "grad_hidden_cosine", "budget"),
         match=gradients.tp_grad_reduction),
    Rule(name="slice_edges", variants=("target_masking/slice_edges",),
         signals=("tp_size", "grad_weight_edge_row_share", "grad_hidden_boundary_share", "boundary_token_fraction",
                  "contract"),
         match=gradients.slice_edges),
    Rule(name="narrow_softmax_and_scale", variants=("accumulator_dtype/narrow_softmax_and_scale",), signals=FIT,
         match=scales.narrow_softmax_and_scale),
    Rule(name="rounded_reciprocal", variants=("accumulator_dtype/rounded_reciprocal",),
         signals=(*FIT, "divisor", "contract"), match=scales.rounded_reciprocal,
         after=("narrow_softmax_and_scale",)),
    Rule(name="fitted_factor", variants=("normalization_scale/fitted_factor",), signals=FIT,
         match=scales.fitted_factor, after=("integer_k", "rounded_reciprocal")),
    Rule(name="different_factors", variants=("accumulator_dtype/different_factors",), signals=FIT,
         match=scales.different_factors, after=("fitted_factor",)),
    Rule(name="norm_factor", variants=("normalization_scale/norm_factor",),
         signals=(*SCALE, "grad_hidden_scaled_residual", "grad_weight_norm_ratio", "grad_weight_scaled_residual"),
         match=scales.norm_factor, after=("fitted_factor",)),
    Rule(name="gradient_shift", variants=("label_smoothing_local_v/gradient_shift",),
         signals=("contract", "tp_size", "loss_offset_per_token", "smoothing_local_offset", "loss_ref",
                  "grad_hidden_rel_err", "grad_weight_rel_err", "grad_hidden_shift_share", "grad_weight_shift_share",
                  "budget"),
         match=offsets.gradient_shift, after=("smoothing_offset",)),
    Rule(name="backward_scale", variants=("backward_scale/pure_factor",),
         signals=("loss_rel_err", "grad_hidden_rel_err", "grad_hidden_norm_ratio", "grad_hidden_cosine",
                  "grad_hidden_scaled_residual", "grad_weight_norm_ratio", "n_tokens", "n_visible", "budget"),
         match=gradients.backward_scale, after=("tp_grad_reduction", "gradient_shift")),
    Rule(name="hidden_gradient_sum", variants=("accumulator_dtype/hidden_gradient_sum",), signals=HIDDEN_ALONE,
         match=gradients.hidden_gradient_sum),
    Rule(name="skipped_terms", variants=("gradient_approximation/skipped_terms",), signals=HIDDEN_ALONE,
         match=gradients.skipped_terms, after=("gradient_shift",)),
    Rule(name="loss_only", variants=("unexplained/loss_only",), signals=ROUNDING_SIZED, match=gradients.loss_only,
         after=("non_finite", "clean", "narrow_softmax", "z_loss", "different_factors", "norm_factor")),
    Rule(name="precision", variants=("accumulator_dtype/precision",), signals=ROUNDING_SIZED,
         match=gradients.precision, after=("slice_edges", "gradient_shift", "loss_only")),
)


def diagnose(report: ParityReport, *, group_sizes: Mapping[str, int] | None = None,
             thresholds: Thresholds = DEFAULT) -> Diagnosis:
    """Name the likely cause of the differences in ``report``: the first rule of :data:`RULES` that matches.

    Args:
        report: the output of :func:`ce_guard.parity.compare` (or of :func:`ce_guard.check_seam`, fitted).
        group_sizes: sizes a scale factor k may be traced to, e.g. ``{"TP": 8, "SP": 8, "DP": 4,
            "grad_accum": 2}``. TP, and DP as the token group's size, are read from the report when absent.
        thresholds: the cut-offs of the verdict and the rules; pass the ones the check ran with.

    Example:
        >>> import torch
        >>> from ce_guard import CEContract, SeamOutputs, compare, reference_linear_cross_entropy
        >>> g = torch.Generator().manual_seed(0)
        >>> hidden, weight = torch.randn(64, 16, generator=g), torch.randn(100, 16, generator=g)
        >>> targets, contract = torch.randint(0, 100, (64,), generator=g), CEContract(vocab_size=100)
        >>> ref = reference_linear_cross_entropy(hidden, weight, targets, contract)
        >>> eight = SeamOutputs(loss=ref.loss * 8, grad_hidden=ref.grad_hidden * 8, grad_weight=ref.grad_weight * 8)
        >>> found = diagnose(compare(eight, ref, contract), group_sizes={"SP": 8})
        >>> found.variant
        'normalization_scale/integer_k'
        >>> print(found.summary)  # doctest: +ELLIPSIS
        loss ratio 8.0000, dL/dh norm ratio 8.0000 (cosine 1.000000), k = 8 = SP size: loss and gradients are 8x ...
    """
    sizes = dict(group_sizes or {})
    sizes.setdefault("TP", report.tp_size)
    sizes.setdefault("DP", report.token_group_size)
    for rule in RULES:
        found = rule.match(report, sizes, thresholds)
        if found is not None:
            return found
    return Diagnosis.of("unexplained/no_signature", True,
                        "parity outside budget and no known signature matches: " + headline(report),
                        core_evidence(report))
