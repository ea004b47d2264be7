"""A parity report from receipts alone: margins, then four panels over steps, drift marked with its cause, and HTML.

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
    """The figure, margins first; drift steps get a red line on every panel, their cause on the top one."""
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(10, 2.6 * len(PANELS)), sharex=True,
                             constrained_layout=True)
    drifts = [r for r in records if r.get("drift")]
    for ax, (panel, drawn) in zip(axes, PANELS, strict=True):
        measured = (_draw_margins(ax, records, drawn) if panel.unit_budget
                    else _draw_metric(ax, records, drawn[0].name, panel))
        for record in drifts:
            ax.axvline(record["step"], color="tab:red", alpha=0.5, linewidth=1)
        ax.set_title(panel.title, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
        if not measured:
            ax.text(0.5, 0.5, "not measured", transform=ax.transAxes, ha="center", va="center", color="gray")
    _label_drifts(axes[0], drifts)
    axes[-1].set_xlabel("trainer/global_step")
    fig.suptitle(f"ce_guard parity: {len(records)} checks, {len(drifts)} with drift", fontsize=11)
    return fig


def _draw_metric(ax, records, name: str, panel: Panel) -> bool:
    steps, values = metric_series(records, name)
    if panel.log and any(v <= 0 for v in values):
        # A zero error (bit-exact) has no log; show it at the bottom of the axis instead of dropping it.
        floor = min((v for v in values if v > 0), default=1e-12) / 10
        values = [max(v, floor) for v in values]
    ax.plot(steps, values, marker="o", markersize=3, linewidth=1, label=name)
    if panel.log and values:
        ax.set_yscale("log")
    if name.endswith("norm_ratio"):
        ax.axhline(1.0, color="black", linewidth=0.6)  # a ratio of 1 is exact
    _draw_budget(ax, records, name, panel.budget)
    return bool(steps)


def _draw_margins(ax, records, drawn: Sequence[MetricSpec]) -> bool:
    """One line per compared quantity (a bit-exact 0 drawn at 1e-6) and the budget's line at 1."""
    measured = False
    for metric in drawn:
        steps, values = metric_series(records, metric.name)
        if steps:
            measured = True
            ax.plot(steps, [max(v, 1e-6) for v in values], marker="o", markersize=3, linewidth=1,
                    label=metric.label)
    ax.axhline(1.0, color="tab:red", linewidth=0.8, linestyle="--", label="budget")
    ax.set_yscale("log")
    ax.legend(loc="upper right", fontsize=8)
    return measured


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
    ax.legend(loc="upper right", fontsize=8)


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
