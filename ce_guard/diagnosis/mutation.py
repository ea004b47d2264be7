"""Rules that read the checksums of the loss path's inputs: a loss path that writes into what it was handed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ce_guard.diagnosis.causes import Diagnosis
from ce_guard.diagnosis.signals import core_evidence, headline
from ce_guard.diagnosis.thresholds import Thresholds
from ce_guard.diagnosis.verdict import over_budget

if TYPE_CHECKING:
    from ce_guard.parity import ParityReport

SEAM_INPUTS = ("hidden", "weight")  # what the reference reads: overwritten, the comparison itself is void


def input_mutation(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """The checksum of an input of the loss path changed across its forward and backward."""
    if not r.mutated_inputs:
        return None
    return seam_inputs(r, sizes, t) or logits(r, sizes, t)


def seam_inputs(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """The hidden states or the weight changed across the loss path's forward and backward.

    Named before anything else: the reference ran on the overwritten tensors, so no other number of the check can
    be trusted, and the model's own later reads (the weight's optimizer step, a tied embedding) see them too.
    """
    changed = [name for name in r.mutated_inputs if name in SEAM_INPUTS]
    if not changed:
        return None
    return Diagnosis.of("input_mutation/seam_inputs", True,
                        f"the loss path wrote into its inputs: the checksum of {' and '.join(changed)} changed across"
                        " its forward and backward, so this check compared against overwritten tensors and anything"
                        " reading them later sees the loss path's scratch values",
                        {**core_evidence(r), "mutated_inputs": ",".join(r.mutated_inputs)})


def logits(r: ParityReport, sizes: Mapping[str, int], t: Thresholds) -> Diagnosis | None:
    """The logits handed to the loss changed, while loss and gradients are within budget.

    The numbers are right; the caller's logits are not (gradients or probabilities written into their storage):
    a later reader of them (a logged perplexity, a second loss on the same logits, multi-token prediction) sees
    garbage. Named only while the numbers are within budget: where they drift too, their rule names the fault the
    training feels (and ``clean`` cannot pass this check).
    """
    changed = [name for name in r.mutated_inputs if name not in SEAM_INPUTS]
    if not changed or over_budget(r, t):
        return None
    return Diagnosis.of("input_mutation/logits", True,
                        f"loss and gradients within budget, but the loss path wrote into the {' and '.join(changed)}"
                        " it was handed (checksum changed across its forward and backward): a later reader of"
                        " them sees the loss path's scratch values, e.g. the logit gradient; " + headline(r),
                        {**core_evidence(r), "mutated_inputs": ",".join(r.mutated_inputs)})
