"""The options both parity callbacks take (Lightning's and transformers' Trainer's), checked in one place so that a
bad value gets the same message from either."""

from __future__ import annotations

from typing import Any

from ce_guard.diagnosis import Thresholds
from ce_guard.drift import POLICIES
from ce_guard.step_weight import TrainingContract


def check_options(*, policy: Any, thresholds: Any, training_contract: Any, counts: dict[str, Any],
                  optional_counts: dict[str, Any]) -> None:
    """Raise a ValueError naming the first bad option: ``counts`` must be ints >= 1, ``optional_counts`` None or
    ints >= 1, the policy one of :data:`~ce_guard.drift.POLICIES`, the training contract ``auto``, None or a
    :class:`~ce_guard.TrainingContract`, the thresholds None or :class:`~ce_guard.Thresholds`."""
    for name, value in {**counts, **optional_counts}.items():
        optional = name in optional_counts
        if not ((optional and value is None) or (isinstance(value, int) and value >= 1)):
            raise ValueError(f"`{name}` must be {'None or ' if optional else ''}an int >= 1, got {value!r}.")
    if policy not in POLICIES:
        raise ValueError(f"`policy` must be one of {POLICIES}, got {policy!r}.")
    if not (training_contract in (None, "auto") or isinstance(training_contract, TrainingContract)):
        raise ValueError("`training_contract` must be 'auto', None or a ce_guard.TrainingContract, got"
                         f" {training_contract!r}.")
    if thresholds is not None and not isinstance(thresholds, Thresholds):
        raise ValueError(f"`thresholds` must be None or a ce_guard.Thresholds, got {type(thresholds).__name__}.")
