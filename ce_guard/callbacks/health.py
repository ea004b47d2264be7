"""SeamHealthCallback: watch the loss and the gradient norm for spikes, and have the seam checked after one.

The statistics live in :mod:`ce_guard.spike`; this callback feeds them from Trainer hooks, schedules a check
on :class:`~ce_guard.callbacks.CEParityCallback` after a spike, and attributes the spike with its verdict.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from ce_guard.callbacks.parity import CEParityCallback
from ce_guard.metrics import metric_key
from ce_guard.spike import RunningMoments, StepValues, total_grad_norm


class SeamHealthCallback(Callback):
    """Watch the loss and the gradient norm for spikes, and have the seam checked on the step after one.

    A spike is a value more than ``z_threshold`` standard deviations above a running (EMA) mean after
    ``warmup`` steps, or a non-finite one. Both values are ones every rank shares, the loss averaged over
    ranks and the global gradient norm, so every rank sees the same spike and asks for the same check: no
    rank waits on a collective another skips. The spike is attributed with that fresh check's verdict, not
    with one up to ``every_n_steps`` old.

    Ordinary steps do not synchronise the host: a step's two values are reduced and copied to host memory
    without blocking when its gradients are ready, and read at the start of the next step, by which time the
    device has long computed them (it is still busy with the optimizer step). With gradient clipping by norm,
    the norm clipping computes is the one watched; no second norm is taken.

    Args:
        z_threshold: standard deviations above the running mean that make a spike.
        decay: the running mean's and variance's EMA decay per step.
        warmup: steps observed before a spike can be called.
        check_on_spike: schedule a :class:`CEParityCallback` check on the step after a spike.
    """

    def __init__(self, *, z_threshold: float = 6.0, decay: float = 0.98, warmup: int = 20,
                 check_on_spike: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"`decay` must be in (0, 1), got {decay!r}.")
        self.z_threshold, self.decay, self.warmup, self.check_on_spike = z_threshold, decay, warmup, check_on_spike
        self.stats = {"loss": RunningMoments(), "grad_norm": RunningMoments()}
        self.spikes: list[dict[str, Any]] = []
        self._parity: CEParityCallback | None = None
        self._unattributed: list[dict[str, Any]] = []  # spikes whose check has not reported yet
        self._loss_sum: torch.Tensor | None = None     # this step's micro-batch losses, on the device
        self._micro_batches = 0
        self._in_flight: StepValues | None = None      # a finished step's values on their way to the host
        self._restore_clipping: Callable[[], None] | None = None  # set while clipping hands us its norm

    def on_fit_start(self, trainer, pl_module) -> None:
        found = [cb for cb in trainer.callbacks if isinstance(cb, CEParityCallback)]
        self._parity = found[0] if found else None
        if self._parity is None:
            rank_zero_warn("SeamHealthCallback: no CEParityCallback on the Trainer, so spikes cannot be attributed.")
        else:
            self._parity.add_listener(self._on_check)
        self._restore_clipping = _take_norm_from_clipping(trainer, lambda norm: self._send(trainer, norm))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._restore_clipping is not None:
            self._restore_clipping()
            self._restore_clipping = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._in_flight is not None:  # the first micro-batch of a new optimizer step
            values, self._in_flight = self._in_flight, None
            self._judge(trainer, pl_module, batch_idx, values)

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        # Lightning hands automatic optimisation's loss over divided by the accumulation count; undo it.
        scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        loss = loss.detach().float() * scale
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._micro_batches += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._restore_clipping is not None:
            return  # the norm arrives from clipping, after this hook (see _take_norm_from_clipping)
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self._send(trainer, total_grad_norm(grads) if grads else None)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._in_flight is not None:
            values, self._in_flight = self._in_flight, None
            self._judge(trainer, pl_module, None, values)
        for spike in self._unattributed:
            self._attribute(trainer, spike, "training ended before a check could run")
        self._unattributed.clear()

    def _send(self, trainer, grad_norm: torch.Tensor | None) -> None:
        """Start this step's (mean loss, gradient norm) on its way to the host: one all-reduce, no wait."""
        self._in_flight = StepValues.share(trainer.global_step, self._loss_sum, self._micro_batches, grad_norm)
        self._loss_sum, self._micro_batches = None, 0

    def _judge(self, trainer, pl_module, batch_idx: int | None, values: StepValues) -> None:
        step = values.step
        spiked = [spike for name, value in values.means().items()
                  if (spike := self._observe(name, value, step)) is not None]
        if not spiked:
            return
        for spike in spiked:
            self.spikes.append(spike)
            for logger in trainer.loggers:
                logger.log_metrics({metric_key(f"{spike['signal']}_spike"): 1.0,
                                    metric_key(f"{spike['signal']}_z"): spike["z"]}, step=step)
        if self._parity is None or not self.check_on_spike or batch_idx is None:
            reason = ("no CEParityCallback on the Trainer" if self._parity is None
                      else "check_on_spike is off" if not self.check_on_spike else "training ended")
            for spike in spiked:
                self._attribute(trainer, spike, reason)
            return
        self._unattributed.extend(spiked)
        self._parity.schedule_check(trainer, pl_module, batch_idx)

    def _observe(self, name: str, value: float, step: int) -> dict[str, Any] | None:
        moments = self.stats[name]
        z = moments.zscore(value)
        spike = moments.count >= self.warmup and (not math.isfinite(value) or z > self.z_threshold)
        moments.update(value, self.decay)
        return {"step": step, "signal": name, "value": value, "z": z, "attribution": None} if spike else None

    def _on_check(self, trainer, step: int, verdict: dict[str, Any] | None, reason: str) -> None:
        """The parity callback's report of a check: attribute every spike before it with this verdict."""
        due = [spike for spike in self._unattributed if spike["step"] < step]
        self._unattributed = [spike for spike in self._unattributed if spike["step"] >= step]
        for spike in due:
            self._attribute(trainer, spike, reason, check_step=step, verdict=verdict)

    def _attribute(self, trainer, spike: dict[str, Any], reason: str, *, check_step: int | None = None,
                   verdict: dict[str, Any] | None = None) -> None:
        head = f"{spike['signal']} spike at step {spike['step']} ({spike['value']:.4g}, z={spike['z']:.1f})"
        if verdict is None:
            spike["attribution"] = "unknown"
            text = (f"the seam check at step {check_step} did not run: {reason}" if check_step is not None
                    else f"not checked: {reason}")
        elif verdict["drift"]:
            spike["attribution"] = "seam"
            text = (f"the seam check at step {check_step}: drifting, {verdict['cause']}: {verdict['summary']}")
        else:
            spike["attribution"] = "elsewhere"
            text = f"the seam check at step {check_step}: clean: look elsewhere"
        for logger in trainer.loggers:
            logger.log_metrics({metric_key("attributable_to_seam"): float(spike["attribution"] == "seam")},
                               step=check_step if check_step is not None else spike["step"])
        rank_zero_warn(f"{head}; {text}.")

    def state_dict(self) -> dict[str, Any]:
        return {"stats": {k: dataclasses.asdict(v) for k, v in self.stats.items()}, "spikes": list(self.spikes)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stats = {k: RunningMoments(**v) for k, v in state_dict["stats"].items()}
        self.spikes = list(state_dict["spikes"])


def _take_norm_from_clipping(trainer: pl.Trainer,
                             take: Callable[[torch.Tensor], None]) -> Callable[[], None] | None:
    """With clipping by norm, have the precision plugin hand ``take`` the norm it computes; returns the undo.

    Lightning's ``Precision.clip_grad_by_norm`` calls ``torch.nn.utils.clip_grad_norm_`` and drops the result;
    this does the same and keeps it. None (nothing changed) without clipping by norm, or where the plugin
    clips its own way: the monitor then takes its own norm.
    """
    from lightning.pytorch.plugins.precision import Precision

    plugin = trainer.precision_plugin
    by_norm = bool(trainer.gradient_clip_val) and trainer.gradient_clip_algorithm in (None, "norm")
    if not by_norm or type(plugin).clip_grad_by_norm is not Precision.clip_grad_by_norm:
        return None

    def clip_grad_by_norm(optimizer, clip_val) -> None:
        norm = torch.nn.utils.clip_grad_norm_(plugin.main_params(optimizer), clip_val)
        full_tensor = getattr(norm, "full_tensor", None)
        take(full_tensor() if full_tensor is not None else norm)

    plugin.clip_grad_by_norm = clip_grad_by_norm
    return lambda: vars(plugin).pop("clip_grad_by_norm", None)
