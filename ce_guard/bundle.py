"""Repro bundles: one drifting check's recorded seam in a ``torch.save`` file, for ``ce-guard replay``.

A bundle holds the recorded inputs and fused outputs, the contract as a dict, and the report and diagnosis
the check reached. The callback writes it on this rank's drift; the CLI loads it on any machine. Both go
through this module, so the schema version is written and checked in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ce_guard.check import SeamRecord
from ce_guard.parity import SeamOutputs

SCHEMA_VERSION = 1
KEYS = ("step", "rank", "contract", "hidden", "weight", "targets", "fused_loss", "fused_grad_hidden",
        "fused_grad_weight", "upstream", "report", "diagnosis")
OPTIONAL_KEYS = ("given_count",)  # written since they exist; a version-1 bundle from before lacks them


class BundleError(ValueError):
    """A file that is not a repro bundle this version of ce_guard can read."""


@dataclass(frozen=True, kw_only=True)
class Bundle:
    """One rank's drifting check: what the seam saw and what the check concluded."""

    step: int
    rank: int
    contract: dict[str, Any]   # CEContract.to_dict(): process groups as their sizes
    record: SeamRecord
    report: dict[str, Any]     # ParityReport.to_dict()
    diagnosis: dict[str, Any]  # Diagnosis.to_dict()


def save_bundle(path: str | os.PathLike, bundle: Bundle) -> Path:
    """Write ``bundle`` (tensors moved to the CPU) to ``path``, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = bundle.record
    torch.save({
        "schema_version": SCHEMA_VERSION, "step": bundle.step, "rank": bundle.rank, "contract": bundle.contract,
        "hidden": record.hidden.cpu(), "weight": record.weight.cpu(), "targets": record.targets.cpu(),
        "fused_loss": record.fused.loss.cpu(), "fused_grad_hidden": _cpu(record.fused.grad_hidden),
        "fused_grad_weight": _cpu(record.fused.grad_weight), "upstream": _cpu(record.upstream),
        "given_count": _cpu(record.given_count),
        "report": bundle.report, "diagnosis": bundle.diagnosis,
    }, path)
    return path


def load_bundle(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Bundle:
    """Read a bundle written by :func:`save_bundle`, its tensors on ``map_location``.

    Loaded with ``weights_only=True``: a bundle holds tensors and plain values, and a file from elsewhere
    must not run code.

    Raises:
        BundleError: the file is missing, unreadable, not a bundle, of another schema version, or incomplete.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle {path} does not exist.")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to unpickle is a bad file, reported in one line
        raise BundleError(f"cannot read bundle {path} as a ce_guard repro bundle"
                          f" ({type(err).__name__}: {' '.join(str(err).split())[:200]}).") from err
    if not isinstance(raw, dict):
        raise BundleError(f"{path} is not a ce_guard repro bundle (found a {type(raw).__name__}, not a dict).")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{path}: bundle schema version {version!r}; this ce_guard reads version {SCHEMA_VERSION}."
                          " Replay it with the ce_guard version that wrote it.")
    missing = [key for key in KEYS if key not in raw]
    if missing:
        raise BundleError(f"{path}: bundle lacks {missing}.")
    if not (isinstance(raw["diagnosis"], dict) and "cause" in raw["diagnosis"]):
        raise BundleError(f"{path}: bundle's `diagnosis` has no recorded cause.")
    fused = SeamOutputs(loss=raw["fused_loss"], grad_hidden=raw["fused_grad_hidden"],
                        grad_weight=raw["fused_grad_weight"])
    record = SeamRecord(hidden=raw["hidden"], weight=raw["weight"], targets=raw["targets"], fused=fused,
                        upstream=raw["upstream"], given_count=raw.get("given_count"))
    return Bundle(step=raw["step"], rank=raw["rank"], contract=raw["contract"], record=record,
                  report=raw["report"], diagnosis=raw["diagnosis"])


def _cpu(value: torch.Tensor | float | None) -> torch.Tensor | float | None:
    return value.cpu() if isinstance(value, torch.Tensor) else value
