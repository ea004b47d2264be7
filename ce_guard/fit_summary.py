"""What the guard saw over a fit, in a few lines: what a user without a logger reads at the end.

Trainer-free: it reads the callback's rank-invariant ``history`` (one verdict per check) and ``missed`` (check
steps without one), and points to the receipts and the command that plots them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def summary_lines(history: Sequence[dict[str, Any]], missed: Sequence[dict[str, Any]], receipts: Path) -> list[str]:
    """Checks, drifts, the first drift with its step and cause, missed checks, the receipts and the report command."""
    drifts = [h for h in history if h["drift"]]
    lines = [f"ce_guard: {len(history)} checks, {len(drifts)} with drift, {len(missed)} missed."]
    if drifts:
        first = drifts[0]
        lines.append(f"  first drift: step {first['step']} (rank {first['rank']}): {first['cause']}: {first['summary']}")
    if history:
        last = history[-1]
        lines.append(f"  last verdict: step {last['step']}: {'DRIFT' if last['drift'] else 'clean'} ({last['cause']})")
    if missed:
        last = missed[-1]
        lines.append(f"  missed: {len(missed)} check steps without a verdict; the last, step {last['step']}:"
                     f" {last['reason']}")
    if receipts.exists():
        lines.append(f"  receipts: {receipts}")
        lines.append(f"  plots: ce-guard report {receipts.parent.parent}")
    else:
        lines.append("  receipts: none written")
    return lines
