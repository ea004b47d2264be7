"""The training loop around the seam, as Lightning runs it: a check step's accumulation window (where it ends,
which micro-batch it records, the counts the training contract is held to: :mod:`ce_guard.step_weight`) and the
parallel groups a factor may be traced to."""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning.pytorch as pl

from ce_guard import _dist
from ce_guard.contract import CEContract
from ce_guard.recording import SeamRecording
from ce_guard.step_weight import StepWindow


@dataclass
class WindowSeen:
    """What the callback saw of a check step's window besides the seam: whether it saw all of it (a check
    scheduled mid-window did not), its micro-batches so far, and the recorded backward's AMP loss scale."""

    whole: bool = True
    micro_batches: int = 0
    loss_scale: float = 1.0

    def note_loss_scale(self, trainer: pl.Trainer) -> None:
        """The loss scale the precision plugin's scaler multiplies this backward's loss by (1 without one)."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.loss_scale = float(scaler.get_scale()) if scaler is not None else 1.0

    def counts(self, trainer: pl.Trainer, recording: SeamRecording, dp_size: int) -> StepWindow | None:
        """The window's counts (a collective on every rank); None where the check began mid-window."""
        if not self.whole:
            return None
        return recording.window(micro_batches=self.micro_batches, accumulate=trainer.accumulate_grad_batches,
                                dp_size=dp_size, loss_scale=self.loss_scale)


def window_ends(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether the optimizer steps after this micro-batch: the window is full, or the epoch's last batch."""
    k, total = trainer.accumulate_grad_batches, trainer.num_training_batches
    return (batch_idx + 1) % k == 0 or (math.isfinite(total) and batch_idx + 1 >= total)


def samples_micro_batch(trainer: pl.Trainer, batch_idx: int, checks: int) -> bool:
    """Whether this micro-batch is the one a check records: position ``checks so far % window``, so that a fault
    in one micro-batch of k is met within k checks."""
    k = trainer.accumulate_grad_batches
    if k == 1:
        return True
    start, total = batch_idx - batch_idx % k, trainer.num_training_batches
    window = k if not math.isfinite(total) else max(min(k, int(total) - start), 1)  # the epoch's last is short
    return batch_idx % k == checks % window


def group_sizes(trainer: pl.Trainer, contract: CEContract) -> dict[str, int]:
    """The sizes a scale factor may be traced to: TP, DP (the token group, else the world over TP), SP, grad_accum."""
    tp = _dist.group_size(contract.tp_group)
    sizes = {"TP": tp, "DP": _dist.group_size(contract.token_group) if contract.token_group is not None else (
        max(trainer.world_size // tp, 1)), "grad_accum": trainer.accumulate_grad_batches}
    if contract.sequence_parallel:
        sizes["SP"] = tp
    return sizes
