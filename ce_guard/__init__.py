"""ce_guard: guard the logits-to-loss seam of a fused output layer during training.

The core (contract, reference, budget, parity, signature, diagnosis, check, receipt, bundle, recording, seams,
agreement, spike, fit_summary, step_weight, drift, evidence) imports neither Lightning nor wandb
(tests/test_walls.py); the Lightning callbacks load Lightning, and the transformers ``Trainer`` callback
(:mod:`ce_guard.hf_trainer`) transformers, only when first asked for.
"""

from ce_guard.budget import ErrorBudget, native_error_budget
from ce_guard.check import CheckResult, SeamRecord, check_seam
from ce_guard.contract import CEContract
from ce_guard.diagnosis import Cause, Diagnosis, Thresholds, diagnose
from ce_guard.drift import SeamDriftError
from ce_guard.parity import ParityReport, SeamOutputs, compare
from ce_guard.reference import ReferenceResult, reference_linear_cross_entropy
from ce_guard.seams import seam
from ce_guard.step_weight import TrainingContract

__all__ = [
    "CEContract", "CEParityCallback", "CEParityTrainerCallback", "Cause", "CheckResult", "Diagnosis", "ErrorBudget",
    "ParityReport", "ReferenceResult", "SeamDriftError", "SeamHealthCallback", "SeamOutputs", "SeamRecord",
    "Thresholds", "TrainingContract", "check_seam", "compare", "diagnose", "native_error_budget",
    "reference_linear_cross_entropy", "seam",
]
__version__ = "0.1.0"

_LIGHTNING_EXPORTS = ("CEParityCallback", "SeamHealthCallback")


def __getattr__(name: str):
    if name in _LIGHTNING_EXPORTS:
        from ce_guard import callbacks

        return getattr(callbacks, name)
    if name == "CEParityTrainerCallback":
        from ce_guard.hf_trainer import CEParityTrainerCallback

        return CEParityTrainerCallback
    raise AttributeError(f"module 'ce_guard' has no attribute {name!r}")
