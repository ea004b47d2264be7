"""Every metric ce_guard logs, registered once: its name, how ranks combine it, where it is shown, what it means.

The parity callback reads a check's values through :func:`check_metrics`, the health callback logs its signals
by :func:`metric_key`, the W&B panels define their summaries and table columns from :data:`METRICS`, and the
parity report draws its panels from it. A name that is not registered here cannot be logged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Literal

from ce_guard.diagnosis import Thresholds, margins
from ce_guard.diagnosis.verdict import DEFAULT
from ce_guard.parity import ParityReport

Reader = Callable[[ParityReport, Thresholds], "float | None"]  # a check's reading of one metric

SECTIONS = ("ce_parity", "ce_health")  # the W&B sections: every key is "<section>/<name>"


@dataclass(frozen=True, kw_only=True)
class Panel:
    """One panel of the parity report (``ce-guard report``)."""

    title: str
    log: bool = True             # log scale
    budget: str | None = None    # the registered metric drawn as the budget line of this panel's metric
    unit_budget: bool = False    # the metrics are error / budget: a budget line at 1, a bit-exact 0 drawn at 1e-6
    one_minus: bool = False      # draw 1 - value on a fixed log range (a cosine: its distance from 1)


MARGIN_PANEL = Panel(title="error / budget (drift above 1)", unit_budget=True)
REPORT_PANELS = (  # in the order they are drawn: the margins lead, one panel says whether every quantity held
    MARGIN_PANEL,
    Panel(title="loss relative error", budget="budget_loss_rel"),
    Panel(title="dL/dh norm ratio (fused / reference)", budget="budget_grad_hidden_rel"),
    Panel(title="1 - dL/dh cosine (0: same direction)", one_minus=True),
    Panel(title="dL/dW norm ratio (fused / reference)"),
    Panel(title="step weight (found / training contract)"),
)


@dataclass(frozen=True, kw_only=True)
class MetricSpec:
    """One logged metric.

    ``reduce`` is how a check's value is combined over ranks (:func:`ce_guard.agreement.agree`): ``mean``, or
    ``max`` where the worst rank is wanted; None for values the callbacks set themselves (alike on every rank,
    or this rank's own, like a check's duration), which ``read`` is None for too.
    """

    name: str
    section: Literal["ce_parity", "ce_health"] = "ce_parity"
    meaning: str
    reduce: Literal["mean", "max"] | None = None
    read: Reader | None = None
    summary: str | None = None   # the W&B run summary, e.g. "max,last"
    table: bool = False          # a column of the W&B receipts table
    panel: Panel | None = None   # the parity report panel that draws it
    label: str | None = None     # its line's label on a panel shared with others

    @property
    def key(self) -> str:
        return f"{self.section}/{self.name}"


def _field(name: str) -> Reader:
    get = attrgetter(name)
    return lambda report, thresholds: get(report)


def _margin(quantity: str) -> Reader:
    """A margin as the check's own thresholds draw its line (the softmax's depends on them)."""
    return lambda report, thresholds: margins(report, thresholds)[quantity]


_LOSS, _DH, _COSINE, _DW, _STEP = REPORT_PANELS[1:]

# A check's readings in the order agree() reduces them; a norm ratio drifts either way (k or 1/k), so its
# summary keeps both ends.
METRICS = (
    MetricSpec(name="loss_fused", meaning="the fused path's loss", reduce="mean",
               read=_field("loss_fused"), table=True),
    MetricSpec(name="loss_ref", meaning="the reference's loss on the same inputs", reduce="mean",
               read=_field("loss_ref"), table=True),
    MetricSpec(name="loss_rel_err", meaning="|fused - reference| / |reference| of the loss", reduce="mean",
               read=_field("loss_rel_err"), summary="max,last", table=True, panel=_LOSS),
    MetricSpec(name="grad_hidden_norm_ratio", meaning="norm of the fused dL/dh over the reference's", reduce="mean",
               read=_field("grad_hidden_norm_ratio"), summary="min,max,last", table=True, panel=_DH),
    MetricSpec(name="grad_cosine", meaning="cosine between the fused and the reference dL/dh", reduce="mean",
               read=_field("grad_hidden_cosine"), summary="min,last", table=True, panel=_COSINE),
    MetricSpec(name="grad_hidden_rel_err", meaning="relative error of the fused dL/dh", reduce="mean",
               read=_field("grad_hidden_rel_err"), summary="max,last"),
    MetricSpec(name="grad_weight_norm_ratio", meaning="norm of the fused dL/dW over the reference's", reduce="mean",
               read=_field("grad_weight_norm_ratio"), summary="min,max,last", table=True, panel=_DW),
    MetricSpec(name="grad_weight_rel_err", meaning="relative error of the fused dL/dW", reduce="mean",
               read=_field("grad_weight_rel_err"), summary="max,last"),
    MetricSpec(name="step_weight_factor",
               meaning="the micro-batch's weight in the optimizer step over the training contract's (1: as promised)",
               reduce="mean", read=lambda report, thresholds: None if report.step_weight is None else (
                   report.step_weight.factor), summary="min,max,last", table=True, panel=_STEP),
    MetricSpec(name="budget_loss_rel", meaning="the loss relative error a correct path stays under", reduce="mean",
               read=_field("budget.loss_rel"), table=True),
    MetricSpec(name="budget_grad_hidden_rel", meaning="the dL/dh relative error a correct path stays under",
               reduce="mean", read=_field("budget.grad_hidden_rel")),
    MetricSpec(name="max_per_token_abs_diff", meaning="largest per-token loss difference (reduction='none')",
               reduce="max", read=_field("per_token_max_abs_diff"), summary="max"),
    MetricSpec(name="max_grad_hidden_abs_diff", meaning="largest element difference of dL/dh", reduce="max",
               read=_field("grad_hidden_max_abs_diff"), summary="max"),
    MetricSpec(name="margin_loss", meaning="loss error / its budget: drift above 1", reduce="max",
               read=_margin("loss"), summary="max,last", panel=MARGIN_PANEL, label="loss"),
    MetricSpec(name="margin_grad_hidden", meaning="dL/dh error / its budget: drift above 1", reduce="max",
               read=_margin("grad_hidden"), summary="max,last", panel=MARGIN_PANEL, label="dL/dh"),
    MetricSpec(name="margin_grad_weight", meaning="dL/dW error / its budget: drift above 1", reduce="max",
               read=_margin("grad_weight"), summary="max,last", panel=MARGIN_PANEL, label="dL/dW"),
    MetricSpec(name="margin_softmax", meaning="per-token softmax spread beyond the native path's: drift above 1",
               reduce="max", read=_margin("softmax"), summary="max,last", panel=MARGIN_PANEL, label="softmax spread"),
    MetricSpec(name="drift", meaning="1 if any rank's check drifted", summary="max,last"),
    MetricSpec(name="check_seconds", meaning="wall time of the check on this rank", summary="mean,max"),
    MetricSpec(name="missed", meaning="1 at a check step that got no verdict (CEParityCallback.missed says why)",
               summary="max"),
    MetricSpec(name="loss_spike", section="ce_health", meaning="1 at a step whose mean loss spiked"),
    MetricSpec(name="loss_z", section="ce_health", meaning="standard deviations of a loss spike above its running mean",
               summary="max"),
    MetricSpec(name="grad_norm_spike", section="ce_health", meaning="1 at a step whose gradient norm spiked"),
    MetricSpec(name="grad_norm_z", section="ce_health",
               meaning="standard deviations of a gradient norm spike above its running mean", summary="max"),
    MetricSpec(name="attributable_to_seam", section="ce_health",
               meaning="1 if the check after a spike found the seam drifting", summary="max"),
)
BY_NAME = {metric.name: metric for metric in METRICS}


def metric_key(name: str) -> str:
    """The logged key of the registered metric ``name``, e.g. ``ce_parity/margin_loss``."""
    try:
        return BY_NAME[name].key
    except KeyError:
        raise KeyError(f"metric {name!r} is not registered in ce_guard.metrics.METRICS; register it there"
                       " first.") from None


def check_metrics(report: ParityReport, thresholds: Thresholds = DEFAULT) -> tuple[
        dict[str, float | None], dict[str, float | None]]:
    """A check's readings to average over ranks, and those whose worst rank is wanted (margins, max diffs)."""
    means = {m.name: m.read(report, thresholds) for m in METRICS if m.reduce == "mean"}
    maxima = {m.name: m.read(report, thresholds) for m in METRICS if m.reduce == "max"}
    return means, maxima
