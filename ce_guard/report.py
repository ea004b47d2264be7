"""A parity report from receipts alone: margins, then a panel per metric over steps, drift marked, and HTML.

Reads only what ``receipts.jsonl`` holds (the DP-averaged ``ce_parity/*`` metrics of each check), so a
report can be made after the run, on another machine, without the model or W&B.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ce_guard.metrics import BY_NAME, METRICS, REPORT_PANELS, MetricSpec, Panel  # noqa: E402

# Each panel with the registered metrics it draws, in the registry's order.
PANELS = tuple((panel, tuple(m for m in METRICS if m.panel is panel)) for panel in REPORT_PANELS)
# One table row per check: the verdict, and the metrics drawn on a panel of their own.
_TABLE_METRICS = tuple(m for panel, drawn in PANELS if not panel.unit_budget for m in drawn)
_VERDICT_COLUMNS = ("step", "drift", "cause")
TABLE_COLUMNS = (*_VERDICT_COLUMNS, *(m.name for m in _TABLE_METRICS), "summary")


def metric_series(records: Sequence[dict[str, Any]], name: str) -> tuple[list[int], list[float]]:
    """Steps and values of the registered metric ``name``; checks that did not measure it are left out."""
    key = BY_NAME[name].key
    steps, values = [], []
    for record in records:
        value = record.get("metrics", {}).get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def plot_receipts(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write :func:`report_figure` of ``records`` to the PNG ``path``."""
    fig = report_figure(records)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report_figure(records: Sequence[dict[str, Any]]) -> Figure:
    """The figure, margins first; drift steps get a red line on every panel, their cause on the top one.

    A panel none of whose metrics any check measured (dL/dW when the checks skip the weight, or it is
    FSDP-sharded) is a thin row with its title and "not measured", no axes: an empty axis would draw its
    ticks and lines through the text and read as data. Legends sit right of their panel, where they cannot
    cover a point.

    Example:
        >>> fig = report_figure(read_receipts("runs/cpu/<run id>/ce_guard/receipts.jsonl"))  # doctest: +SKIP
    """
    measured = [any(metric_series(records, m.name)[0] for m in drawn) for _, drawn in PANELS]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(11, 0.4 + sum(2.6 if m else 0.5 for m in measured)),
                             sharex=True, constrained_layout=True,
                             gridspec_kw={"height_ratios": [1.0 if m else 0.12 for m in measured]})
    drifts = [r for r in records if r.get("drift")]
    for ax, (panel, drawn), has_values in zip(axes, PANELS, measured, strict=True):
        ax.set_title(panel.title, fontsize=10, loc="left")
        if not has_values:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="gray")
            continue
        if panel.unit_budget:
            _draw_margins(ax, records, drawn)
        else:
            _draw_metric(ax, records, drawn[0].name, panel)
        for record in drifts:
            ax.axvline(record["step"], color="tab:red", alpha=0.5, linewidth=1)
        ax.grid(alpha=0.3)
    shown = [ax for ax, has_values in zip(axes, measured, strict=True) if has_values]
    if shown:  # sharex labels only the bottom row's steps; that row may be text alone
        shown[-1].xaxis.set_tick_params(labelbottom=True)
        shown[-1].set_xlabel("trainer/global_step")
        _label_drifts(shown[0], drifts)
    fig.suptitle(f"ce_guard parity: {len(records)} checks, {len(drifts)} with drift", fontsize=11)
    return fig


# 1 - cosine on a fixed log range, from float64's resolution (the cosine is computed in float64: nothing
# closer to 1 can be told from it) to 2 (opposite directions). Each decade then means the same on every
# report: a clean run's rounding sits low and flat (4e-16 to 8e-14 in fp32, 1.6e-6 in bf16), and a turned
# gradient stands decades above it (bf16 accumulators in an fp32 run 3e-6, a missing z-loss 8e-6, a coarse
# backward 2e-2; all from tests/assets/diagnoses.jsonl). The cosine itself on a linear axis fails both
# ways: autoscaled, matplotlib draws 1 - 4e-13 against an offset ("1e-13+1") and rounding becomes a cliff;
# with limits wide enough to show a drop, every one of those faults lies on the line at 1.
_ONE_MINUS_RANGE = (1e-16, 2.0)


def _draw_metric(ax, records, name: str, panel: Panel) -> None:
    steps, values = metric_series(records, name)
    if panel.one_minus:
        low, high = _ONE_MINUS_RANGE
        values = [min(max(1 - v, low), high) for v in values]  # a cosine of 1 (or 1 + rounding) at the bottom
    elif panel.log and any(v <= 0 for v in values):
        # A zero error (bit-exact) has no log; show it at the bottom of the axis instead of dropping it.
        floor = min((v for v in values if v > 0), default=1e-12) / 10
        values = [max(v, floor) for v in values]
    ax.plot(steps, values, marker="o", markersize=3, linewidth=1, label=name)
    if panel.log or panel.one_minus:
        ax.set_yscale("log")
    if panel.one_minus:
        ax.set_ylim(_ONE_MINUS_RANGE[0] / 4, _ONE_MINUS_RANGE[1] * 4)  # fixed: rounding must not fill the axis
    if name.endswith("norm_ratio"):
        ax.axhline(1.0, color="black", linewidth=0.6)  # a ratio of 1 is exact
    _draw_budget(ax, records, name, panel.budget)


def _draw_margins(ax, records, drawn: Sequence[MetricSpec]) -> None:
    """One line per compared quantity (a bit-exact 0 drawn at 1e-6) and the budget's line at 1."""
    for metric in drawn:
        steps, values = metric_series(records, metric.name)
        if steps:
            ax.plot(steps, [max(v, 1e-6) for v in values], marker="o", markersize=3, linewidth=1,
                    label=metric.label)
    ax.axhline(1.0, color="tab:red", linewidth=0.8, linestyle="--", label="budget")
    ax.set_yscale("log")
    _legend(ax)


def _draw_budget(ax, records, name: str, budget: str | None) -> None:
    if budget is None:
        return
    steps, limits = metric_series(records, budget)
    if not steps:
        return
    if name.endswith("norm_ratio"):  # a relative error of b bounds the norm ratio to [1 - b, 1 + b]
        ax.step(steps, [1 + b for b in limits], where="mid", color="gray", linestyle="--", label="budget")
        ax.step(steps, [max(1 - b, 1e-12) for b in limits], where="mid", color="gray", linestyle="--")
    else:
        ax.step(steps, limits, where="mid", color="gray", linestyle="--", label="budget")
    _legend(ax)


def _legend(ax) -> None:
    """Right of the axes: inside, "best" still covers a point when the data leave no empty corner."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)


def _label_drifts(ax, drifts: Sequence[dict[str, Any]]) -> None:
    """Name each drift's cause once per run of equal causes, so a long drift does not stack labels."""
    previous = None
    for record in drifts:
        if record.get("cause") != previous:
            ax.annotate(record.get("cause", "?"), xy=(record["step"], 1), xycoords=("data", "axes fraction"),
                        xytext=(2, -2), textcoords="offset points", rotation=90, va="top", fontsize=8,
                        color="tab:red")
        previous = record.get("cause")


def write_html(records: Sequence[dict[str, Any]], png: str | Path, path: str | Path, *, source: str) -> Path:
    """A self-contained page: the PNG inlined as base64 and one table row per check."""
    image = base64.b64encode(Path(png).read_bytes()).decode()
    rows = []
    for record in records:
        metrics = record.get("metrics", {})
        values = ([record.get(column) for column in _VERDICT_COLUMNS] + [metrics.get(m.key) for m in _TABLE_METRICS]
                  + [record.get("summary")])
        cells = [f"<td>{html.escape(_format(value))}</td>" for value in values]
        rows.append(f"<tr class=\"{'drift' if record.get('drift') else 'ok'}\">{''.join(cells)}</tr>")
    header = "".join(f"<th>{html.escape(c)}</th>" for c in TABLE_COLUMNS)
    drifts = sum(bool(r.get("drift")) for r in records)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ce_guard parity report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: left; }}
tr.drift {{ background: #fde2e2; }}
</style></head><body>
<h1>ce_guard parity report</h1>
<p>{len(records)} checks, {drifts} with drift. Source: <code>{html.escape(source)}</code></p>
<img alt="parity over steps" src="data:image/png;base64,{image}">
<table><thead><tr>{header}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    path = Path(path)
    path.write_text(page)
    return path


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
