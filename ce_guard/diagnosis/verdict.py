"""The verdict of one check: each compared quantity against its line, decided here and nowhere else.

A margin is error / budget, so 1 is the line a correct path stays under for every quantity: the loss, dL/dh,
dL/dW, each per-token loss (``reduction='none'``) and the per-token softmax spread. A check is within budget
when nothing is non-finite and no margin is over 1; ``compare``, ``check_seam`` and ``diagnose`` all ask
:func:`over_budget`, so they cannot disagree about one report.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from ce_guard.diagnosis.thresholds import Thresholds

if TYPE_CHECKING:  # parity imports this module to decide its reports
    from ce_guard.parity import ParityReport
    from ce_guard.signature import SignatureFit

DEFAULT = Thresholds()
# What over_budget names, in the order it names them.
QUANTITIES = ("non_finite", "loss", "per_token", "grad_hidden", "grad_weight", "softmax")


def margins(report: ParityReport, thresholds: Thresholds = DEFAULT) -> dict[str, float | None]:
    """Error / budget per compared quantity: 1 is the line a correct path stays under; None where not measured."""
    return {**error_margins(report), "softmax": softmax_margin(report.signature, thresholds)}


def error_margins(report: ParityReport) -> dict[str, float | None]:
    """The margins of the loss and the gradients: their relative errors over their budgets."""
    b = report.budget
    return {"loss": _ratio(report.loss_rel_err, b.loss_rel),
            "grad_hidden": _ratio(report.grad_hidden_rel_err, b.grad_hidden_rel),
            "grad_weight": _ratio(report.grad_weight_rel_err, b.grad_weight_rel)}


def softmax_margin(fit: SignatureFit | None, thresholds: Thresholds = DEFAULT) -> float | None:
    """How far each token's softmax factor spreads beyond the native path's, against the line a correct path stays
    under: the lesser of its standard errors over ``flag_spread_sigmas`` and its rms excess over ``narrow_softmax``
    (above 1 only when both are). None where no signature was fitted.

    A correct path rounds each token's softmax no more widely than the native path (logits in the input dtype,
    softmax in fp32). Wider is a narrower dtype's rounding of the softmax's statistics: unbiased per token, so it
    cancels in the mean loss and hides in the gradients' norm budget (docs/faults.md, row 3).
    """
    if fit is None:
        return None
    return min(max(fit.spread_sigmas(), 0.0) / thresholds.flag_spread_sigmas,
               fit.softmax_excess / thresholds.narrow_softmax)


def over_budget(report: ParityReport, thresholds: Thresholds = DEFAULT) -> tuple[str, ...]:
    """The quantities over their line (names from ``QUANTITIES``, in that order); empty when within budget.

    A NaN margin is over: a comparison that cannot be made is not passed.
    """
    lines = {**margins(report, thresholds),
             "per_token": _ratio(report.per_token_max_abs_diff, report.budget.per_token_abs)}
    over = ["non_finite"] if any(report.nonfinite.values()) else []
    over += [name for name in QUANTITIES[1:] if lines[name] is not None and not lines[name] <= 1.0]
    return tuple(over)


def judged(report: ParityReport, thresholds: Thresholds = DEFAULT) -> ParityReport:
    """``report`` with ``within_budget`` set from :func:`over_budget`: the one place that field is written."""
    return dataclasses.replace(report, within_budget=not over_budget(report, thresholds))


def _ratio(err: float | None, budget: float) -> float | None:
    return None if err is None else (err / budget if budget > 0 else math.inf)
