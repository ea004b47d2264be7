"""Rules for the gradient between the seam's loss and the optimizer step: the training contract's weight missed.

Each reads the report's :class:`~ce_guard.step_weight.StepWeight` (the recorded micro-batch's weight found and
expected); a seam that computes its loss right can still reach the optimizer at the wrong weight. A loss term
beside the seam (a Megatron MTP depth, :class:`~ce_guard.step_weight.LossTerm`) is read the same way, and two rules
are its own: divided by the main loss's token count, or rescaled by one rank's counts where the group's are due.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ce_guard.diagnosis.causes import Diagnosis
from ce_guard.diagnosis.signals import core_evidence
from ce_guard.diagnosis.thresholds import Thresholds

if TYPE_CHECKING:
    from ce_guard.parity import ParityReport
    from ce_guard.step_weight import StepWeight


def mtp_main_count(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """A loss term (an MTP depth) averaged over the main loss's token count where its own is due."""
    s = _off(r)
    if s is None or s.term is None:
        return None
    own, main, where = _term_counts(s)
    if own == main or not s.close(s.expected * own / max(main, 1)):
        return None
    w = f"{s.term.weight:.4g}"
    return Diagnosis.of("window_weighting/mtp_main_count", True,
                        f"{_head(s)}: {s.term.name} counts {own} tokens {where} (the loss mask rolled by its depth)"
                        f" but its per-token losses were divided by the main loss's {main}, so each weighs {w}/{main}"
                        f" where the training contract ({s.weighting}) says {w}/{own}: {own}/{main} ="
                        f" {s.factor:.4g}x (megatron-core to 0.16.1 with calculate_per_token_loss=True sums the MTP"
                        " loss and leaves it to finalize_model_grads' divide by the main count: Megatron-LM issue"
                        f" 2417); divide the term by its own {own} tokens (Megatron-LM PR 3159 rescales by N/M, with"
                        " each rank's own counts)", _evidence(r))


def mtp_local_count(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """A loss term rescaled from the main count to its own with this micro-batch's counts, where the data-parallel
    group's (or the window's) are due: right only where every rank's ratio is the group's."""
    s = _off(r)
    if s is None or s.term is None or s.weighting == "micro_batch_mean" or s.tokens == 0:
        return None
    own, main, where = _term_counts(s)
    local = s.term.main_tokens / s.tokens
    if not s.close(s.expected * local * own / max(main, 1)):
        return None
    return Diagnosis.of("window_weighting/mtp_local_count", True,
                        f"{_head(s)}: {s.term.name}'s losses were rescaled by this micro-batch's own ratio,"
                        f" {s.term.main_tokens}/{s.tokens} (main tokens over its own), then divided by the main loss's"
                        f" {main} tokens {where}; that is the training contract's ({s.weighting}) weight only where"
                        f" every rank's ratio is the group's {main}/{own}, so this rank's weighs {s.factor:.4g}x"
                        " (Megatron-LM PR 3159's local N/M rescale under data parallelism with unequal counts:"
                        f" issue 7452); rescale by the counts {where}, all-reduced ({main}/{own})", _evidence(r))


def partial_window(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """A short window (the epoch's last) divided by the full window's count: its micro-batches under-weighted."""
    s = _off(r)
    if s is None or s.micro_batches >= s.accumulate or not s.close(s.expected * s.micro_batches / s.accumulate):
        return None
    return Diagnosis.of("window_weighting/partial_window", True,
                        f"{_head(s)}: this step's window had {s.micro_batches} micro-batches, and each was divided"
                        f" by the full window's {s.accumulate}, so the step's gradient is"
                        f" {s.micro_batches}/{s.accumulate} of its size (a fixed divide by the accumulation count in"
                        " the epoch's short last window); divide by the micro-batches the window has", _evidence(r))


def micro_batch_mean(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Micro-batches weighed alike (each one's mean divided by the accumulation count) where tokens should be."""
    s = _off(r)
    if s is None or s.weighting == "micro_batch_mean":
        return None
    count = next((c for c in (s.accumulate, s.micro_batches) if c > 1 and s.close(1 / c)), None)
    if count is None:
        return None
    return Diagnosis.of("window_weighting/micro_batch_mean", True,
                        f"{_head(s)}: each micro-batch's mean loss weighed 1/{count}, alike, where the training"
                        f" contract ({s.weighting}) weighs micro-batches by their counted tokens: this one's"
                        f" {s.tokens} of the window's {s.window_tokens} should weigh {s.expected:.4g}, so it is"
                        f" {s.factor:.4g}x (a fixed divide by the accumulation count under unequal padding); sum the"
                        " window's token losses and divide by its counted tokens", _evidence(r))


def local_tokens(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """Tokens weighed alike within each rank's window, not over the data-parallel group."""
    s = _off(r)
    if s is None or s.weighting != "global_tokens" or s.dp_size < 2:
        return None
    if not s.close(s.tokens / max(s.window_tokens, 1)):
        return None
    return Diagnosis.of("window_weighting/local_tokens", True,
                        f"{_head(s)}: this rank's micro-batch weighed its {s.tokens} of its own window's"
                        f" {s.window_tokens} tokens, where the training contract (global_tokens) weighs it by the"
                        f" data-parallel group's {s.global_tokens} tokens over {s.dp_size} ranks; divide by the"
                        " group's counted tokens (all-reduced) and multiply by the data-parallel size", _evidence(r))


def loss_scaled_outside(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """The loss multiplied by a factor between the seam and the optimizer step."""
    s = _off(r)
    if s is None:
        return None
    whole_step = s.dp_size if s.weighting == "global_tokens" else 1
    if s.micro_batches > 1 and s.close(whole_step):
        variant, why = "accumulation", (f"each of the window's {s.micro_batches} micro-batches weighed as a whole"
                                        " step: the divide by the accumulation (or by its token count) is missing")
    elif s.dp_size > 1 and any(abs(s.factor - f) <= s.tolerance * f for f in (s.dp_size, 1 / s.dp_size)):
        variant, why = "world_size", (f"{s.factor:.4g} is the data-parallel size {s.dp_size} or its inverse: a"
                                      " multiply or divide by the world size is missing or doubled")
    else:
        variant, why = "factor", "a factor applied to the loss outside the seam (in the training step or its loss code)"
    return Diagnosis.of(f"loss_scaled_outside/{variant}", True, f"{_head(s)}: {why}", _evidence(r))


def _off(r: ParityReport) -> StepWeight | None:
    s = r.step_weight
    return s if s is not None and s.off else None


def _term_counts(s: StepWeight) -> tuple[int, int, str]:
    """A term's counted tokens and the main loss's, where the training contract counts them, and where that is."""
    if s.weighting == "global_tokens":
        return s.global_tokens, s.term.main_global_tokens, "over the data-parallel group"
    if s.weighting == "window_tokens":
        return s.window_tokens, s.term.main_window_tokens, "in the window"
    return s.tokens, s.term.main_tokens, "in its micro-batch"


def _head(s: StepWeight) -> str:
    way = "heavier" if s.factor > 1 else "lighter"
    who = "the loss" if s.term is None else f"{s.term.name}'s loss (weight {s.term.weight:.4g}, divided out)"
    return (f"{who} reached the optimizer {s.factor:.4g}x {way} than the training contract ({s.weighting}) says:"
            f" expected {s.expected:.4g} per micro-batch ({s.micro_batches} of {s.accumulate} accumulated,"
            f" {s.tokens} of {s.window_tokens} tokens), found {s.found:.4g}")


def _evidence(r: ParityReport) -> dict[str, float | int | str]:
    s = r.step_weight
    return {**core_evidence(r), "step_weight_found": s.found, "step_weight_expected": s.expected, "step_weight_factor": s.factor,
            "weighting": s.weighting, "tokens": s.tokens, "window_tokens": s.window_tokens,
            "global_tokens": s.global_tokens, "micro_batches": s.micro_batches, "accumulate": s.accumulate,
            "dp_size": s.dp_size, **({} if s.term is None else {
                "term": s.term.name, "term_weight": s.term.weight, "main_tokens": s.term.main_tokens,
                "main_window_tokens": s.term.main_window_tokens, "main_global_tokens": s.term.main_global_tokens})}
