"""The training loop's own faults, between the seam's loss and the optimizer step: the ``training_step`` rows of
:data:`~ce_guard.testing.injections.INJECTIONS`, committed on the loss that reaches backward
(``ce_guard.demos.inject.InjectTrainingFault``). The seam stays exact; only the training contract can see them."""

from __future__ import annotations

from collections.abc import Callable

# switch -> the factor the loss reaching backward is multiplied by, given the accumulation count k
TRAINING_FAULTS: dict[str, Callable[[int], float]] = {
    "doubled_loss": lambda k: 2.0,             # a `loss * 2` in training_step
    "undivided_accumulation": lambda k: float(k),  # each micro-batch's loss multiplied back by k: no divide
}


def training_fault_factor(fault: str, accumulate: int) -> float:
    """The factor ``fault`` multiplies the loss by under accumulation over ``accumulate`` micro-batches."""
    if fault not in TRAINING_FAULTS:
        raise ValueError(f"unknown training fault {fault!r}; expected one of {list(TRAINING_FAULTS)}.")
    return TRAINING_FAULTS[fault](accumulate)
