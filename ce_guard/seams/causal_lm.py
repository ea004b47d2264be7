"""A Hugging Face causal LM, unchanged: the seam runs from the decoder's last hidden state to the returned loss.

Every ``*ForCausalLM`` of transformers computes ``lm_head(decoder(...).last_hidden_state)``, an output-side
transform its config names, and ``loss_function`` (labels padded with the ignore index and shifted by one,
then a mean over the non-ignored tokens or a sum over ``num_items_in_batch``). Liger-Kernel's patched
forwards keep the decoder and hand ``lm_head.weight`` to a fused linear-CE instead, so hooks on the decoder's
output and on the model's call see the same seam either way: hidden, the head's weight, the labels as the
model shifts them, the loss, dL/dhidden and the upstream gradient. dL/dW is not measured: the head's own
loss code cannot be replayed apart from the model.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ce_guard.contract import CEContract
from ce_guard.recording import SeamRecording, local_weight
from ce_guard.seams.refusal import ONE_LINE, SeamRefused

try:
    from transformers import PreTrainedModel
except ImportError as err:  # pragma: no cover - exercised where transformers is absent
    raise ImportError("Guarding a Hugging Face model needs transformers: pip install 'ce_guard[transformers]'.") from err

# What each model's forward does to lm_head's logits, read from its config (transformers 5.x, modeling_*.py).
_MULTIPLIERS = {"falcon_h1": lambda c: c.lm_head_multiplier, "cohere": lambda c: c.logit_scale,
                "cohere2": lambda c: c.logit_scale, "granite": lambda c: 1.0 / c.logits_scaling,
                "granitemoe": lambda c: 1.0 / c.logits_scaling, "granitemoeshared": lambda c: 1.0 / c.logits_scaling,
                "granitemoehybrid": lambda c: 1.0 / c.logits_scaling}
_SOFTCAPPED = ("gemma2", "gemma3_text")
_Z_LOSS = ("bamba",)  # z_loss_coefficient * mean over every position of lse**2, outside num_items_in_batch
# Config fields that mean an output transform in some model; on a model type not above, they are refused.
_TRANSFORM_FIELDS = {"logit_scale": 1.0, "logits_scaling": 1.0, "lm_head_multiplier": 1.0,
                     "final_logit_softcapping": None, "z_loss_coefficient": 0.0}


def is_causal_lm(module: nn.Module) -> bool:
    """A transformers model with an output head and a decoder whose output feeds it."""
    return (isinstance(module, PreTrainedModel) and getattr(module, "loss_type", None) == "ForCausalLM"
            and module.get_output_embeddings() is not None)


def causal_lm_contract(model: PreTrainedModel) -> CEContract:
    """The promises the model's forward keeps, from its config: vocabulary, ignore index, mean over the
    non-ignored shifted labels, and its output-side terms."""
    config, kind = model.config, model.config.model_type
    options: dict[str, Any] = {}
    if kind in _MULTIPLIERS:
        options["logit_multiplier"] = float(_MULTIPLIERS[kind](config))
    elif kind in _SOFTCAPPED:
        options["softcap"] = config.final_logit_softcapping
    elif kind in _Z_LOSS:
        if config.z_loss_coefficient:
            options.update(z_loss=float(config.z_loss_coefficient), z_loss_positions="all")
    else:
        unknown = {f: getattr(config, f) for f, neutral in _TRANSFORM_FIELDS.items()
                   if getattr(config, f, neutral) != neutral}
        if unknown:
            raise SeamRefused(f"{type(model).__name__}'s config sets {unknown}, an output transform ce_guard does not"
                              f" know for model type {kind!r}; declare the seam where you compute the loss: {ONE_LINE}")
    vocab = model.get_output_embeddings().weight.shape[0]
    return CEContract(vocab_size=vocab, **options)


class CausalLMSeam:
    """Hooks on a transformers causal LM: its calls with labels are counted, the first one armed is recorded."""

    def __init__(self, model: PreTrainedModel, name: str = "") -> None:
        self.model, self.name = model, name or type(model).__name__
        self.decoder = model.get_decoder()
        if self.decoder is None or self.decoder is model:
            raise SeamRefused(f"`{self.name}` ({type(model).__name__}) exposes no decoder (`get_decoder()`) whose"
                              f" output is the head's input; declare the seam in your loss code: {ONE_LINE}")
        self.contract = causal_lm_contract(model)
        self._signature = inspect.signature(model.forward)
        self._extra = next((p.name for p in self._signature.parameters.values() if p.kind == p.VAR_KEYWORD), None)

    def describe(self) -> str:
        return f"`{self.name}` ({type(self.model).__name__}, decoder output to the returned loss)"

    def record(self) -> SeamRecording:
        recording, call = SeamRecording(), {}

        def before_model(module, args, kwargs) -> None:
            call.clear()
            bound = self._signature.bind_partial(*args, **kwargs).arguments
            extra = bound.get(self._extra, {}) if self._extra else {}
            labels, shift_labels = bound.get("labels"), extra.get("shift_labels")
            if labels is None and shift_labels is None:
                return  # this call computes no loss (evaluation, generation): not the seam
            keep = bound.get("logits_to_keep", 0)
            if not (isinstance(keep, int) and keep == 0):
                raise ValueError(f"logits_to_keep={keep!r} slices the hidden states before the head")
            ignore_index = extra.get("ignore_index", -100)
            if shift_labels is None:
                shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
            call.update(targets=shift_labels, ignore_index=ignore_index,
                        given_count=extra.get("num_items_in_batch"))

        def after_decoder(module, args, output) -> None:
            if call and "hidden" not in call and recording.wants_tensors:
                call["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
                call["weight"] = local_weight(self.model.get_output_embeddings().weight).detach().clone()

        def after_model(module, args, kwargs, output) -> None:
            if not call:
                return
            recording.count(call["targets"], call["ignore_index"])
            if not recording.wants_tensors:
                return
            if "hidden" not in call:
                raise RuntimeError("the decoder did not run inside the model's call")
            loss = getattr(output, "loss", None)
            contract, given = self._contract_for(call)
            recording.capture(hidden=call["hidden"], weight=call["weight"], targets=call["targets"], loss=loss,
                              contract=contract, given_count=given)
            aux = getattr(output, "aux_loss", None)
            if torch.is_tensor(aux):  # a MoE router loss was added to the loss: accounted for, not compared
                recording.loss = recording.loss - getattr(self.model, "router_aux_loss_coef", 0.0) * aux.detach()

        recording.keep(self.model.register_forward_pre_hook(recording.guard(before_model), with_kwargs=True))
        recording.keep(self.decoder.register_forward_hook(recording.guard(after_decoder)))
        recording.keep(self.model.register_forward_hook(recording.guard(after_model), with_kwargs=True))
        return recording

    def _contract_for(self, call: dict[str, Any]) -> tuple[CEContract, float | None]:
        """This call's contract: the model's, with the ignore index and the divisor the call passed."""
        given = call["given_count"]
        options: dict[str, Any] = {"ignore_index": int(call["ignore_index"])}
        if given is not None:
            options["normalize_by"] = "given_count"
            given = float(given)
        return dataclasses.replace(self.contract, **options), given
