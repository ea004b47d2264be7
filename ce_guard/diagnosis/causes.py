"""The names a diagnosis gives: the causes, their rows in the fault catalogue (docs/faults.md), and ``Diagnosis``."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


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
    BACKWARD_SCALE = "backward_scale"
    OUTPUT_TRANSFORM = "output_transform"
    LOSS_SCALED_OUTSIDE = "loss_scaled_outside"
    WINDOW_WEIGHTING = "window_weighting"
    UPSTREAM_BROADCAST = "upstream_broadcast"
    UPSTREAM_ORDER = "upstream_order"
    INPUT_MUTATION = "input_mutation"
    PENALTY_NORMALIZATION = "penalty_normalization"
    UNEXPLAINED = "unexplained"


# The row of the fault catalogue (docs/faults.md, heading "## <row>. <cause>") each drift cause belongs to.
FAULT_ROW = {
    Cause.NORMALIZATION_OWNER: 1, Cause.NORMALIZATION_SCALE: 2, Cause.ACCUMULATOR_DTYPE: 3,
    Cause.TARGET_MASKING: 4, Cause.IGNORE_INDEX_LEAK: 5, Cause.LABEL_SMOOTHING_LOCAL_V: 6,
    Cause.LOG_TP_OFFSET: 7, Cause.Z_LOSS_BOUNDARY: 8, Cause.GRADIENT_APPROXIMATION: 9, Cause.NON_FINITE: 10,
    Cause.TP_GRAD_REDUCTION: 11, Cause.BACKWARD_SCALE: 12, Cause.OUTPUT_TRANSFORM: 13,
    Cause.LOSS_SCALED_OUTSIDE: 14, Cause.WINDOW_WEIGHTING: 15, Cause.UPSTREAM_BROADCAST: 16, Cause.UPSTREAM_ORDER: 17,
    Cause.INPUT_MUTATION: 18, Cause.PENALTY_NORMALIZATION: 19,
}


def catalogue_entry(cause: Cause) -> str | None:
    """Where the fault catalogue describes ``cause``; None for the outcomes that are no fault row.

    Example:
        >>> catalogue_entry(Cause.LABEL_SMOOTHING_LOCAL_V)
        'docs/faults.md#6-label_smoothing_local_v'
    """
    row = FAULT_ROW.get(cause)
    return None if row is None else f"docs/faults.md#{row}-{cause.value}"


@dataclass(frozen=True)
class Diagnosis:
    """A named cause, whether it is drift, one sentence a person can act on, and the evidence.

    ``variant`` is ``"<cause>/<which signature>"`` (e.g. ``tp_grad_reduction/partial``): the machine-readable
    name of the rule that matched, for tests and dashboards to assert on instead of the prose.

    Example:
        >>> d = Diagnosis.of("z_loss_boundary/missing", True, "z-loss is missing from the fused path")
        >>> d.cause, d.fault_row, d.catalogue_entry
        (<Cause.Z_LOSS_BOUNDARY: 'z_loss_boundary'>, 8, 'docs/faults.md#8-z_loss_boundary')
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
