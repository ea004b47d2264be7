"""What a drift verdict does to the fit: the policies, and the error that ``raise`` ends it with."""

from __future__ import annotations

from typing import Literal

from ce_guard.diagnosis import Cause, catalogue_entry

Policy = Literal["warn", "raise", "stop"]
POLICIES = ("warn", "raise", "stop")


class SeamDriftError(RuntimeError):
    """The fused output layer broke its declared contract (raised on every rank under ``policy='raise'``)."""

    def __init__(self, step: int, rank: int, cause: str, summary: str) -> None:
        super().__init__(f"CE seam drift at step {step} (rank {rank}): {cause}: {summary}")
        self.step, self.rank, self.cause, self.summary = step, rank, cause, summary


def drift_warning(step: int, rank: int, cause: str, summary: str, bundle: str | None) -> str:
    """The warning a new drift gets: the named cause, its fault catalogue entry and the repro bundle."""
    catalogue = catalogue_entry(Cause(cause))
    return (f"CE seam drift at step {step} (rank {rank}): {cause}: {summary}."
            f"{f' See {catalogue}.' if catalogue else ''} Repro bundle: {bundle}")
