"""W&B for the parity callback: step axes, summaries, a receipts table; on drift an alert and the bundle.

Built on Lightning's ``WandbLogger``, found in ``trainer.loggers``. Without one every method is a no-op:
the metrics still reach the other loggers and receipts and bundles still reach local files. ``wandb``
itself is imported only once a ``WandbLogger`` is present, so ``import ce_guard`` never needs it.
W&B is observability: a failed alert or upload warns once per kind and never ends training.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from ce_guard.metrics import METRICS, SECTIONS

STEP_KEY = "trainer/global_step"  # WandbLogger.log_metrics adds it to every row it logs
TABLE_KEY = "ce_parity/receipts"
BUNDLE_TYPE = "ce_guard-bundle"
_RECEIPT_COLUMNS = ("step", "drift", "cause", "summary", "rank")
_TABLE_METRICS = tuple(m for m in METRICS if m.table)  # the registered metrics of the same check
COLUMNS = (*_RECEIPT_COLUMNS, *(m.name for m in _TABLE_METRICS), "bundle")
SUMMARIES = {m.key: m.summary for m in METRICS if m.summary}  # run summaries worth a glance


def find_wandb_logger(trainer: pl.Trainer) -> WandbLogger | None:
    """The Trainer's first ``WandbLogger``, or None."""
    return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)


class WandbPanels:
    """Everything ce_guard shows in W&B for one fit. Acts on global rank zero only, where the run lives.

    Args:
        trainer: the Trainer whose ``WandbLogger`` (if any) receives the panels.

    Example:
        >>> panels = WandbPanels(trainer)   # in on_fit_start; defines the axes and summaries
        >>> panels.log_check(receipt)       # after each check; alert + bundle artifact on drift
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        logger = find_wandb_logger(trainer) if trainer.is_global_zero else None
        self._run = None if logger is None else logger.experiment
        self._rows: list[list[Any]] = []
        self._bundles_seen: set[str | None] = set()
        self._table = None
        self._warned: set[str] = set()
        if self._run is not None:
            self._guard("metric definitions", self._define_metrics)

    @property
    def active(self) -> bool:
        return self._run is not None

    def _define_metrics(self) -> None:
        # Lightning defines "*" against STEP_KEY only for runs it creates itself; a reused wandb.run lacks it.
        self._run.define_metric(STEP_KEY)
        for section in SECTIONS:
            self._run.define_metric(f"{section}/*", step_metric=STEP_KEY)
        for name, summary in SUMMARIES.items():
            self._run.define_metric(name, step_metric=STEP_KEY, summary=summary)

    def log_check(self, receipt: dict[str, Any]) -> None:
        """Add the receipt just appended to receipts.jsonl to the table; alert and upload on drift."""
        if self._run is None:
            return
        self._guard("receipts table", self._log_table, receipt)
        # A drift that goes on keeps its first bundle (CEParityCallback): alert and upload once for it.
        if receipt["drift"] and receipt.get("bundle") not in self._bundles_seen:
            self._bundles_seen.add(receipt.get("bundle"))
            self._guard("alert", self._alert, receipt)
            if receipt.get("bundle"):
                self._guard("bundle artifact", self._log_bundle, receipt)

    def _log_table(self, receipt: dict[str, Any]) -> None:
        import wandb

        metrics = receipt.get("metrics", {})
        self._rows.append([receipt.get(key) for key in _RECEIPT_COLUMNS]
                          + [_finite_or_none(metrics.get(m.key)) for m in _TABLE_METRICS]
                          + [receipt.get("bundle")])
        if self._table is None:
            # Tables are immutable once logged; INCREMENTAL (wandb >= 0.20) logs only the new rows each time.
            self._table = _incremental_table(wandb, COLUMNS)
        if self._table is not None:
            self._table.add_data(*self._rows[-1])
            table = self._table
        else:  # older wandb: a fresh table with every row, re-logged under the same key
            table = wandb.Table(columns=list(COLUMNS), data=self._rows, allow_mixed_types=True)
        self._run.log({TABLE_KEY: table, STEP_KEY: receipt["step"]})

    def _alert(self, receipt: dict[str, Any]) -> None:
        import wandb

        title = f"CE seam drift: {receipt['cause']}"[:63]  # W&B caps titles under 64 characters
        text = (f"Step {receipt['step']}, rank {receipt['rank']}: {receipt['summary']}."
                f" Repro bundle: {receipt.get('bundle')}")
        self._run.alert(title=title, text=text, level=wandb.AlertLevel.WARN)

    def _log_bundle(self, receipt: dict[str, Any]) -> None:
        import wandb

        path = Path(receipt["bundle"])
        artifact = wandb.Artifact(f"ce_guard-bundle-{self._run.id}", type=BUNDLE_TYPE,
                                  description=f"ce-guard replay {path.name}",
                                  metadata={k: receipt.get(k) for k in ("step", "rank", "cause", "summary")})
        artifact.add_file(str(path), name=path.name)
        self._run.log_artifact(artifact, aliases=["latest", f"step{receipt['step']}"])

    def _guard(self, what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - W&B is observability; it must never end training
            if what not in self._warned:
                self._warned.add(what)
                rank_zero_warn(f"ce_guard could not log the W&B {what} ({type(err).__name__}: {err});"
                               " receipts and bundles are still written locally.")


def _incremental_table(wandb, columns: tuple[str, ...]):
    try:
        # Mixed types: a column is None until its first value (the bundle path, dL/dW when not replayed).
        return wandb.Table(columns=list(columns), log_mode="INCREMENTAL", allow_mixed_types=True)
    except TypeError:  # wandb < 0.20 has no log_mode
        return None


def _finite_or_none(value: Any) -> float | None:
    """W&B tables reject NaN in numeric columns; a missing number is None."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
