"""transformers' ``Trainer`` label smoother as the seam: the decoder's last hidden state to the loss the Trainer
computes outside the model when ``label_smoothing_factor > 0``.

There the Trainer pops ``labels``, calls the model without them (so the model computes no loss, and adds no z-loss
or router loss) and hands the logits to ``trainer.label_smoother(outputs, labels, shift_labels=True, ...)``:
PyTorch's smoothing formula over the whole vocabulary, summed over the counted tokens and divided by
``num_items_in_batch`` where the Trainer passes it (transformers 5.15 and later), else by the micro-batch's counted
tokens (4.46 to 5.14.1, transformers issue 46731). This seam hooks the decoder's output as
:class:`~ce_guard.seams.causal_lm.CausalLMSeam` does and, while a recording is installed, wraps the Trainer's
``label_smoother``; removing the recording puts the Trainer's own back. dL/dW is not measured.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.nn.functional as F

from ce_guard.contract import CEContract
from ce_guard.recording import SeamRecording, local_weight
from ce_guard.seams.causal_lm import causal_lm_contract
from ce_guard.seams.refusal import SeamRefused


class LabelSmootherSeam:
    """Hooks on a causal LM's decoder and a wrap of ``trainer.label_smoother``: each smoother call is counted, the
    first one armed is recorded."""

    def __init__(self, model: Any, trainer: Any) -> None:
        self.model, self.trainer = model, trainer
        self.decoder = model.get_decoder()
        if self.decoder is None or self.decoder is model:
            raise SeamRefused(f"{type(model).__name__} exposes no decoder (`get_decoder()`) whose output is the head's"
                              " input, so the label smoother's seam cannot be recorded.")
        smoother = trainer.label_smoother
        if smoother is None:
            raise SeamRefused("the Trainer has no label smoother (`label_smoothing_factor` is 0).")
        # The model's vocabulary and logit transforms; its own loss terms (z-loss, router loss) need labels it is
        # not given here.
        self.contract: CEContract = dataclasses.replace(
            causal_lm_contract(model), label_smoothing=float(smoother.epsilon), ignore_index=int(smoother.ignore_index),
            z_loss=0.0, z_loss_positions="counted")

    def describe(self) -> str:
        return (f"`{type(self.model).__name__}` (decoder output to the loss of the Trainer's label smoother,"
                f" epsilon {self.contract.label_smoothing:g})")

    def record(self) -> SeamRecording:
        recording, seen = SeamRecording(), {}
        smoother = self.trainer.label_smoother

        def after_decoder(module, args, output) -> None:
            seen.clear()
            if recording.wants_tensors:
                seen["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
                seen["weight"] = local_weight(self.model.get_output_embeddings().weight).detach().clone()

        def after_smoother(labels: torch.Tensor, shift_labels: bool, given: Any, loss: torch.Tensor) -> None:
            ignore_index = self.contract.ignore_index
            # (B, T): position t's target, as the hidden states at t predict it (the smoother drops the last logit)
            targets = F.pad(labels[..., 1:], (0, 1), value=ignore_index) if shift_labels else labels
            recording.count(targets, ignore_index)
            if not recording.wants_tensors:
                return
            if "hidden" not in seen:
                raise RuntimeError("the decoder did not run before the Trainer's label smoother")
            contract = self.contract
            if given is not None:  # transformers >= 5.15: the window's count divides the smoothed sum
                contract, given = dataclasses.replace(contract, normalize_by="given_count"), float(given)
            recording.capture(hidden=seen.pop("hidden"), weight=seen.pop("weight"), targets=targets, loss=loss,
                              contract=contract, given_count=given)

        tap = recording.guard(after_smoother)

        @functools.wraps(smoother)  # keeps the smoother's `epsilon` and `ignore_index` readable on the wrap
        def smoothed(model_output, labels, shift_labels=False, **kwargs):
            loss = smoother(model_output, labels, shift_labels=shift_labels, **kwargs)
            tap(labels, shift_labels, kwargs.get("num_items_in_batch"), loss)
            return loss

        self.trainer.label_smoother = smoothed
        recording.keep(_Restore(self.trainer, smoother))
        recording.keep(self.decoder.register_forward_hook(recording.guard(after_decoder)))
        return recording


@dataclasses.dataclass
class _Restore:
    """A hook handle that puts the Trainer's own label smoother back."""

    trainer: Any
    smoother: Any

    def remove(self) -> None:
        self.trainer.label_smoother = self.smoother
