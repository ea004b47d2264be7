"""What a check leaves behind for a person: the receipt (one JSON line per check) and, on drift, the repro bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ce_guard.agreement import Agreement
from ce_guard.bundle import Bundle, save_bundle
from ce_guard.check import CheckResult, SeamRecord
from ce_guard.contract import CEContract
from ce_guard.reference import reduction_plan


def write_bundle(run_dir: str, step: int, rank: int, contract: CEContract, record: SeamRecord,
                 result: CheckResult) -> str:
    """This rank's repro bundle of the check: ``ce-guard replay`` runs the same check from it."""
    path = Path(run_dir) / "ce_guard" / "bundles" / f"step{step:08d}_rank{rank}.pt"
    bundle = Bundle(step=step, rank=rank, contract=contract.to_dict(), record=record,
                    report=result.report.to_dict(), diagnosis=result.diagnosis.to_dict())
    return str(save_bundle(path, bundle))


def check_receipt(entry: dict[str, Any], epoch: int, metrics: dict[str, float], agreement: Agreement,
                  result: CheckResult, contract: CEContract, bundle: str | None) -> dict[str, Any]:
    """The receipt of an agreed check: its history entry, the logged metrics, every number of the report."""
    return {
        **entry, "epoch": epoch, "metrics": metrics, "ranks": agreement.ranks,
        "drifting_ranks": agreement.drifting_ranks,
        "report": result.report.to_dict(), "sampled_tokens": result.sampled_tokens,
        "seam": reduction_plan(contract), "bundle": bundle,
    }
