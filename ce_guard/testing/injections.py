"""The one table of seam faults that demos and tests inject, and what the guard must name for each.

A row's ``switch`` is the ``fault=`` value of :class:`~ce_guard.testing.FaultyFusedLinearCrossEntropy`
(ce_guard's fused layer breaking one promise) and of ``tests/broken_paths.py`` (a plain vocab-parallel
cross-entropy that shares no code with ce_guard): one switch per distinct way of breaking the seam. Its
``cause`` is the public name of the fault (:class:`~ce_guard.diagnosis.Cause`, a heading of docs/faults.md);
``variants`` maps each input dtype the fault is named in to the ``Diagnosis.variant`` the first check gives.
``tests/test_injections.py`` drives every row on its meshes; ``configs/faults`` and ``configs/parity``
are checked against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ce_guard.diagnosis import Cause, catalogue_entry

__all__ = ["DTYPES", "INJECTIONS", "MESHES", "Injection", "injection", "switches"]

Mesh = Literal["TP=1", "TP=2", "DP=2", "SP"]
MESHES = ("TP=1", "TP=2", "DP=2", "SP")  # one rank; 2 vocab slices; 2 token ranks; 2 sequence shards (TP=2)
DTYPES = ("float32", "bfloat16")  # of the hidden states and weight


@dataclass(frozen=True, kw_only=True)
class Injection:
    """One switch: how it breaks the seam, where it is implemented, and what the guard names.

    Args:
        switch: the ``fault=`` value.
        what: the mistake, in one line.
        cause: the fault's public name.
        variants: input dtype -> ``Diagnosis.variant`` at the first check (tests/test_injections.py's inputs),
            for each dtype the tests or the calibration (``benchmarks/calibrate_guard.py power``) show it named in.
        layer_variants: where the faulty layer's signature differs from the broken path's, its own variants.
        meshes: where it shows: a partition fault needs vocab slices, a normalisation owner several ranks.
        layer: :class:`~ce_guard.testing.FaultyFusedLinearCrossEntropy` implements it.
        broken_path: ``tests/broken_paths.py`` implements it.
        contract: what the contract must declare for the fault to have something to break. Under
            ``reduction='none'`` tests/test_injections.py checks [S,B] per-token losses under random per-token
            upstream weights (a mean taken outside the layer), so that the weights have an order to break.
        fault_scale: the factor k of ``grad_scale`` (the layer's ``fault_scale``, the broken path's ``scale``).
        chunks: the broken path's blocks of a bf16 running sum, where the default 8 is too few to show.
        causal_lm: architectures of ``ce_guard.demos.hf_models`` whose own loss code
            ``ce_guard.testing.causal_lm_faults`` breaks this way.
        training_step: the training loop commits it on the loss that reaches backward
            (``ce_guard.testing.training_faults``; tests/test_step_weight.py drives it at accumulation 4).
        upstream: the loss's upstream gradient in tests/test_injections.py, for a fault that shows only where it
            is not 1 (0.25: what gradient accumulation over 4 micro-batches hands a mean).
    """

    switch: str
    what: str
    cause: Cause
    variants: Mapping[str, str]
    layer_variants: Mapping[str, str] = field(default_factory=dict)
    meshes: tuple[Mesh, ...]
    layer: bool = False
    broken_path: bool = False
    contract: Mapping[str, float | str] = field(default_factory=dict)
    fault_scale: float | None = None
    chunks: int | None = None
    causal_lm: tuple[str, ...] = ()
    training_step: bool = False
    upstream: float = 1.0

    def __post_init__(self) -> None:
        where = f"Injection {self.switch!r}"
        if not (self.layer or self.broken_path or self.causal_lm or self.training_step):
            raise ValueError(f"{where}: expected `layer`, `broken_path`, `causal_lm` or `training_step` to implement"
                             " it, found none.")
        if not self.variants or set(self.variants) - set(DTYPES) or set(self.layer_variants) - set(self.variants):
            raise ValueError(f"{where}: `variants` keys must be some of {DTYPES} and hold `layer_variants`' keys,"
                             f" found {sorted(self.variants)} and {sorted(self.layer_variants)}.")
        wrong = [v for v in (*self.variants.values(), *self.layer_variants.values())
                 if v.split("/")[0] != self.cause.value]
        if wrong:
            raise ValueError(f"{where}: variants {wrong} must start with the cause {self.cause.value!r}.")
        if not self.meshes or set(self.meshes) - set(MESHES):
            raise ValueError(f"{where}: `meshes` must be some of {MESHES}, found {self.meshes}.")

    @property
    def anchor(self) -> str:
        """The catalogue entry, e.g. ``docs/faults.md#5-ignore_index_leak``."""
        return catalogue_entry(self.cause)

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(self.variants)

    def variant(self, implementation: str, dtype: str) -> str:
        """The variant the first check names for ``implementation`` (``"layer"`` or ``"broken_path"``) in ``dtype``."""
        if implementation == "layer" and dtype in self.layer_variants:
            return self.layer_variants[dtype]
        return self.variants[dtype]


def _both(variant: str) -> dict[str, str]:
    return {"float32": variant, "bfloat16": variant}


INJECTIONS: tuple[Injection, ...] = (
    Injection(switch="local_normalization", what="each rank divides by its own visible tokens, the contract says"
              " the global count", cause=Cause.NORMALIZATION_OWNER, variants=_both("normalization_owner/token_count"),
              meshes=("DP=2",), layer=True, broken_path=True),
    Injection(switch="shard_normalization", what="an SP rank divides by its own sequence shard's visible tokens",
              cause=Cause.NORMALIZATION_OWNER, variants={"float32": "normalization_owner/token_count"},
              meshes=("SP",), broken_path=True),
    Injection(switch="grad_scale", what="loss and gradients times k (a grad-accumulation divide missing)",
              cause=Cause.NORMALIZATION_SCALE, variants=_both("normalization_scale/integer_k"),
              meshes=("TP=1", "TP=2"), layer=True, broken_path=True, fault_scale=2, causal_lm=("llama", "nemotron_h")),
    Injection(switch="bf16_accumulators", what="max, denominator and dW held in bf16 under an fp32 contract",
              cause=Cause.ACCUMULATOR_DTYPE,
              variants={"float32": "accumulator_dtype/precision", "bfloat16": "accumulator_dtype/narrow_softmax"},
              layer_variants={"bfloat16": "accumulator_dtype/different_factors"}, meshes=("TP=1",), layer=True,
              broken_path=True),
    Injection(switch="bf16_grad_hidden_sum", what="dL/dh summed over vocab blocks in bf16 (Cut CE 25.1.1's dL/de)",
              cause=Cause.ACCUMULATOR_DTYPE, variants=_both("accumulator_dtype/hidden_gradient_sum"),
              meshes=("TP=1",), broken_path=True, chunks=128),
    Injection(switch="unmasked_partition_targets", what="other slices' targets clamped into this slice, not masked",
              cause=Cause.TARGET_MASKING, variants=_both("target_masking/slice_edges"), meshes=("TP=2",),
              layer=True, broken_path=True),
    Injection(switch="partition_off_by_one", what="each slice also admits target == vocab_end",
              cause=Cause.TARGET_MASKING, variants=_both("target_masking/slice_edges"), meshes=("TP=2",),
              layer=True, broken_path=True),
    Injection(switch="ignore_in_denominator", what="ignored tokens counted in the mean's divisor",
              cause=Cause.IGNORE_INDEX_LEAK, variants=_both("ignore_index_leak/padding_in_divisor"),
              meshes=("TP=1",), layer=True, broken_path=True, causal_lm=("zamba2", "jamba")),
    Injection(switch="ignored_as_class_zero", what="ignored targets gathered as class 0 and kept in the loss",
              cause=Cause.IGNORE_INDEX_LEAK, variants={"float32": "ignore_index_leak/ignored_rows"},
              meshes=("TP=1",), broken_path=True),
    Injection(switch="smoothing_local_vocab", what="label smoothing's uniform term over V/TP, not V",
              cause=Cause.LABEL_SMOOTHING_LOCAL_V, variants=_both("label_smoothing_local_v/loss_offset"),
              meshes=("TP=2",), layer=True, broken_path=True, contract={"label_smoothing": 0.1}),
    Injection(switch="gathered_logits_log_tp", what="the reduced denominator summed over TP again: loss + log(TP)",
              cause=Cause.LOG_TP_OFFSET, variants=_both("log_tp_offset/denominator_twice"), meshes=("TP=2",),
              layer=True, broken_path=True),
    Injection(switch="missing_z_loss", what="the contract's z-loss dropped", cause=Cause.Z_LOSS_BOUNDARY,
              variants=_both("z_loss_boundary/missing"), meshes=("TP=1",), layer=True, broken_path=True,
              contract={"z_loss": 1e-3}),
    Injection(switch="coarse_backward", what="backward drops small dL/dz entries (Cut CE's filter, exaggerated)",
              cause=Cause.GRADIENT_APPROXIMATION, variants=_both("gradient_approximation/skipped_terms"),
              meshes=("TP=1",), broken_path=True),
    Injection(switch="nan", what="a NaN in the loss", cause=Cause.NON_FINITE, variants={"float32": "non_finite/values"},
              meshes=("TP=1",), broken_path=True),
    Injection(switch="partial_grad_hidden", what="dL/dh left unreduced over TP", cause=Cause.TP_GRAD_REDUCTION,
              variants=_both("tp_grad_reduction/partial"), meshes=("TP=2",), broken_path=True),
    Injection(switch="doubled_grad_hidden", what="dL/dh all-reduced over TP twice", cause=Cause.TP_GRAD_REDUCTION,
              variants=_both("tp_grad_reduction/doubled"), meshes=("TP=2",), broken_path=True),
    Injection(switch="backward_scale", what="the logit gradient divided by the tokens in backward only (Transformer"
              " Engine 2.2-2.4's reduce_loss=False)", cause=Cause.BACKWARD_SCALE,
              variants=_both("backward_scale/pure_factor"), meshes=("TP=1",), broken_path=True),
    Injection(switch="z_loss_over_all_rows", what="the z-loss as one mean over every row, ignored ones included,"
              " where the contract puts it on the counted tokens", cause=Cause.PENALTY_NORMALIZATION,
              variants=_both("penalty_normalization/z_loss_over_all"), meshes=("TP=1",), broken_path=True,
              contract={"z_loss": 1e-2}),
    Injection(switch="z_loss_over_counted_tokens", what="the z-loss on the counted tokens only where the contract"
              " (transformers' Bamba) takes it over every row", cause=Cause.PENALTY_NORMALIZATION,
              variants=_both("penalty_normalization/z_loss_over_counted"), meshes=("TP=1",), broken_path=True,
              contract={"z_loss": 1e-2, "z_loss_positions": "all"}),
    Injection(switch="l2_warp_over_counted", what="the L2-warp penalty averaged over the counted tokens where the"
              " contract (fla's l2_warp) averages it over every row", cause=Cause.PENALTY_NORMALIZATION,
              variants=_both("penalty_normalization/l2_warp_over_counted"), meshes=("TP=1",), broken_path=True,
              contract={"l2_warp": 0.5}),
    Injection(switch="l2_warp_over_all_rows", what="the L2-warp penalty averaged over every row where the contract"
              " averages it over the counted tokens", cause=Cause.PENALTY_NORMALIZATION,
              variants=_both("penalty_normalization/l2_warp_over_all"), meshes=("TP=1",), broken_path=True,
              contract={"l2_warp": 0.5, "l2_warp_rows": "counted"}),
    Injection(switch="l2_warp_upstream_ignored", what="the L2-warp penalty's gradient not multiplied by the upstream"
              " gradient", cause=Cause.BACKWARD_SCALE, variants=_both("backward_scale/l2_warp_upstream_ignored"),
              meshes=("TP=1",), broken_path=True, contract={"l2_warp": 0.5}, upstream=0.25),
    Injection(switch="doubled_loss", what="the loss times 2 in training_step, outside the seam",
              cause=Cause.LOSS_SCALED_OUTSIDE, variants=_both("loss_scaled_outside/factor"), meshes=("TP=1",),
              training_step=True),
    Injection(switch="undivided_accumulation", what="each micro-batch's loss multiplied back by the accumulation"
              " count: the divide missing", cause=Cause.LOSS_SCALED_OUTSIDE,
              variants=_both("loss_scaled_outside/accumulation"), meshes=("TP=1",), training_step=True),
    Injection(switch="dropped_logit_multiplier", what="the head's logit multiplier dropped (its config still says it)",
              cause=Cause.OUTPUT_TRANSFORM, variants=_both("output_transform/dropped"), meshes=("TP=1",),
              causal_lm=("falcon_h1", "cohere")),
    Injection(switch="doubled_logit_multiplier", what="the head's logit multiplier applied twice",
              cause=Cause.OUTPUT_TRANSFORM, variants=_both("output_transform/doubled"), meshes=("TP=1",),
              causal_lm=("falcon_h1",)),
    Injection(switch="inverted_logit_multiplier", what="the head multiplies by the config's divisor (or divides)",
              cause=Cause.OUTPUT_TRANSFORM, variants=_both("output_transform/inverted"), meshes=("TP=1",),
              causal_lm=("falcon_h1",)),
    Injection(switch="dropped_softcap", what="the logits' softcap dropped", cause=Cause.OUTPUT_TRANSFORM,
              variants=_both("output_transform/softcap_dropped"), meshes=("TP=1",), causal_lm=("gemma2",)),
    # Per-token upstream weights: per-token losses (reduction='none') under random per-token upstream gradients.
    Injection(switch="upstream_first_token", what="the first token's upstream gradient applied to every token"
              " (Liger-Kernel's fused linear-CE up to 0.8.1, Transformer Engine's parallel_cross_entropy up to 2.7)",
              cause=Cause.UPSTREAM_BROADCAST, variants=_both("upstream_broadcast/first_token"),
              meshes=("TP=1", "TP=2"), broken_path=True, contract={"reduction": "none"}),
    Injection(switch="upstream_permuted", what="each token's upstream gradient applied to another token",
              cause=Cause.UPSTREAM_ORDER, variants=_both("upstream_order/permuted"), meshes=("TP=1", "TP=2"),
              broken_path=True, contract={"reduction": "none"}),
    Injection(switch="upstream_transposed", what="an [S,B] view of a [B,S] upstream gradient read as contiguous"
              " (Transformer Engine 2.8-2.10)", cause=Cause.UPSTREAM_ORDER, variants=_both("upstream_order/transposed"),
              meshes=("TP=1", "TP=2"), broken_path=True, contract={"reduction": "none"}),
)

# docs/faults.md #18: loss paths that write into what they were handed (appended apart, for an easy merge).
INJECTIONS += (
    Injection(switch="overwrites_hidden", what="dL/dh written into the caller's hidden states after backward",
              cause=Cause.INPUT_MUTATION, variants=_both("input_mutation/seam_inputs"), meshes=("TP=1",),
              broken_path=True),
    Injection(switch="overwrites_logits", what="dL/dlogits written into the logits' storage in backward"
              " (Transformer Engine's parallel_cross_entropy to 2.17)", cause=Cause.INPUT_MUTATION,
              variants=_both("input_mutation/logits"), meshes=("TP=1",), broken_path=True),
)


def injection(switch: str) -> Injection:
    """The row of ``switch``; a ValueError naming the switches there are otherwise."""
    for row in INJECTIONS:
        if row.switch == switch:
            return row
    raise ValueError(f"unknown fault switch {switch!r}; expected one of {[row.switch for row in INJECTIONS]}.")


def switches(*, layer: bool = False, broken_path: bool = False) -> tuple[str, ...]:
    """The switches the faulty layer (``layer=True``) or the broken path (``broken_path=True``) implements."""
    return tuple(row.switch for row in INJECTIONS if (layer and row.layer) or (broken_path and row.broken_path))
