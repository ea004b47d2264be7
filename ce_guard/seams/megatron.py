"""A megatron-core ``GPTModel`` (or ``MambaModel``), unchanged: the seam runs from the output layer's input to the
per-token loss ``model(..., labels=...)`` returns.

Both models end in ``LanguageModule``'s pattern (megatron-core 0.16): ``logits, _ = output_layer(hidden,
weight=shared_or_none)`` on hidden ``[s, b, d]`` (a ``ColumnParallelLinear``: this TP rank's vocabulary slice, or
the embedding's slice when ``share_embeddings_and_output_weights``), then ``compute_language_model_loss(labels,
logits)``: Megatron's vocab-parallel cross-entropy, per token, returned ``[b, s]``. Megatron's labels are already
the next tokens and carry no ignore index: padding is the training loop's ``loss_mask``, so it reaches the seam
as a zero upstream gradient (``(losses * loss_mask).sum() / loss_mask.sum()`` hands each token ``mask / count``).
The per-token upstream is what the reference is run with; the loss is compared token by token.

With multi-token prediction the output layer runs once per MTP depth before the main call; the main call (the
last one) is the seam. The MTP losses enter the graph below it (``MTPLossAutoScaler``, whose backward hands each
depth's per-token loss a gradient of its own), so each depth is a :class:`~ce_guard.recording.TermRecording` beside
the seam: the upstream of its per-token loss (``compute_language_model_loss``'s output, wrapped on the instance while
the recording is installed) and its counted tokens (the loss mask rolled by its depth, as ``roll_tensor`` rolls it
without context parallelism or packed sequences; with either, the depths are not held). Each is held to the training
contract as a mean over its own tokens times ``mtp_loss_scaling_factor / mtp_num_layers``. The contract is the
model's: ``calculate_per_token_loss=True`` means every token of the data-parallel group weighs alike and ranks are
summed (``finalize_model_grads`` divides by the main loss's global count), else a masked mean per micro-batch.
Tokens are counted by the ``loss_mask`` the model is given, as Megatron's loop counts them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ce_guard._dist import group_size
from ce_guard.contract import CEContract
from ce_guard.recording import SeamRecording, TermRecording, local_weight
from ce_guard.seams.refusal import ONE_LINE, SeamRefused
from ce_guard.step_weight import TrainingContract

try:
    from megatron.core import parallel_state
    from megatron.core.models.common.language_module.language_module import LanguageModule
except ImportError as err:  # pragma: no cover - exercised where megatron-core is absent
    raise ImportError("Guarding a megatron-core model needs megatron-core: pip install 'ce_guard[megatron]'.") from err

_GUARDED = ("GPTModel", "MambaModel")  # LanguageModules whose forward is output_layer -> compute_language_model_loss


def is_megatron_lm(module: nn.Module) -> bool:
    """A megatron-core GPTModel or MambaModel (or a subclass of one)."""
    return isinstance(module, LanguageModule) and any(
        cls.__name__ in _GUARDED and cls.__module__.startswith("megatron.core.") for cls in type(module).__mro__)


def megatron_contract(model: LanguageModule) -> CEContract:
    """The promises the model's forward keeps: per-token losses over this TP rank's vocabulary slice (Megatron's
    own vocab-range rule), fp32 softmax statistics, and label smoothing only where a subclass declares it.

    Raises:
        SeamRefused: a rank without the output layer (a pipeline stage before the last), sequence parallelism, or
            an overridden ``compute_language_model_loss`` that does not declare its smoothing.
    """
    name = type(model).__name__
    if not getattr(model, "post_process", True) or getattr(model, "output_layer", None) is None:
        raise SeamRefused(f"{name} has no output layer on this rank (a pipeline stage before the last);"
                          " ce_guard guards the stage that computes the loss only, and pipeline parallelism is not"
                          " supported yet.")
    config = model.config
    tp_group = model.pg_collection.tp if getattr(model, "pg_collection", None) is not None else (
        parallel_state.get_tensor_model_parallel_group())
    tp, rank = group_size(tp_group), torch.distributed.get_rank(tp_group) if tp_group is not None else 0
    if config.sequence_parallel and tp > 1:
        raise SeamRefused(f"{name} runs with sequence_parallel=True: its output layer sees [s/tp, b, d] and"
                          " returns losses of the gathered sequence, a layout this seam does not record yet. Guard"
                          f" a run without sequence parallelism, or declare the seam in your loss code: {ONE_LINE}")
    smoothing = 0.0
    if type(model).compute_language_model_loss is not LanguageModule.compute_language_model_loss:
        declared = getattr(model, "ce_label_smoothing", None)
        if declared is None:
            raise SeamRefused(f"{name} overrides `compute_language_model_loss`, so ce_guard cannot know its loss."
                              " If the override only passes `label_smoothing=eps` to Megatron's"
                              " vocab_parallel_cross_entropy, set `model.ce_label_smoothing = eps`; otherwise"
                              f" declare the seam in your loss code: {ONE_LINE}")
        smoothing = float(declared)
    vocab = model.vocab_size
    rows = local_weight(_output_weight(model)).shape[0]  # Megatron's rule: [rank * V/TP, (rank + 1) * V/TP)
    # Megatron's smoothing spreads eps over the V - 1 other classes: PyTorch's formula with eps * V / (V - 1).
    return CEContract(vocab_size=vocab, reduction="none", ignore_index=-100, accum_dtype=torch.float32,
                      label_smoothing=smoothing * vocab / (vocab - 1),
                      layout="[S,B,V/TP]" if tp > 1 else "[N,V]", vocab_start=rank * rows,
                      vocab_end=(rank + 1) * rows, tp_group=tp_group if tp > 1 else None)


def megatron_training_contract(config: Any) -> TrainingContract | None:
    """The weighting Megatron's loop gives the losses: with ``calculate_per_token_loss`` every token of the
    data-parallel group alike (the loss summed, gradients summed over ranks, then divided by the group's count);
    otherwise None, the seam contract's own (a masked mean per micro-batch, gradients averaged)."""
    return TrainingContract("global_tokens", data_parallel="sum") if config.calculate_per_token_loss else None


def _output_weight(model: LanguageModule) -> torch.Tensor:
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


class _SequenceFirstRecording(SeamRecording):
    """Megatron's seam is sequence-first (hidden ``[s, b, d]``) but returns its loss ``[b, s]``: the loss and
    its upstream are kept ``[s, b]``, token for token with the hidden states and targets."""

    def capture(self, **kwargs: Any) -> None:
        super().capture(**kwargs)
        self.loss = self.loss.transpose(0, 1)                        # (S, B)

    def _capture_upstream(self, grad: torch.Tensor) -> None:
        self.upstream = grad.detach().transpose(0, 1).clone()      # (S, B)


class MegatronSeam:
    """Hooks on a megatron-core language model: its calls with labels are counted, the first one armed is
    recorded (the output layer's last input before the call returns, its weight, the labels, the loss)."""

    def __init__(self, model: LanguageModule, name: str = "") -> None:
        self.model, self.name = model, name or type(model).__name__
        self.contract = megatron_contract(model)
        self._signature = inspect.signature(model.forward)

    def describe(self) -> str:
        return f"`{self.name}` ({type(self.model).__name__}, output layer input to the per-token loss)"

    def record(self) -> SeamRecording:
        recording, call = _SequenceFirstRecording(), {}
        config = self.model.config
        recording.training = megatron_training_contract(config)
        depths = config.mtp_num_layers or 0
        recording.terms = [TermRecording(f"MTP depth {d}", config.mtp_loss_scaling_factor / depths)
                           for d in range(1, depths + 1)]

        def before_model(module, args, kwargs) -> None:
            call.clear()
            bound = self._signature.bind_partial(*args, **kwargs).arguments
            if bound.get("labels") is None:
                return  # logits only (evaluation, generation): not the seam
            if bound.get("runtime_gather_output") and group_size(self.contract.tp_group) > 1:
                raise ValueError("runtime_gather_output=True gathers the logits before a vocab-parallel loss")
            call["targets"] = bound["labels"].transpose(0, 1)       # [b, s] -> (S, B), as the logits are
            mask = bound.get("loss_mask")
            call["mask"] = call["rolled"] = mask if mask is not None else torch.ones_like(bound["labels"])  # [b, s]
            call["depth"] = 0
            if bound.get("packed_seq_params") is not None or group_size(getattr(self.model, "cp_group", None)) > 1:
                recording.terms.clear()  # roll_tensor's boundaries are not this seam's to redo: depths not held

        def before_output(module, args, kwargs) -> None:
            if call and recording.wants_tensors:  # the last call before the model returns is the main one
                call["hidden"] = args[0] if args else kwargs["input_"]
                weight = kwargs.get("weight")
                call["weight"] = module.weight if weight is None else weight

        def mtp_loss(losses: torch.Tensor) -> None:
            """An MTP depth's per-token loss [b, s]: the calls before the main one, in depth order."""
            if not call or call["depth"] >= len(recording.terms):
                return
            term = recording.terms[call["depth"]]
            call["depth"] += 1
            rolled = torch.roll(call["rolled"], shifts=-1, dims=-1)
            rolled[..., -1] = 0                                    # as roll_tensor does on one CP rank
            call["rolled"] = rolled
            term.count(rolled)
            if recording.wants_tensors:
                handle = term.capture(losses, rolled, call["mask"], recording.guard)
                if handle is not None:
                    recording.keep(handle)

        def after_model(module, args, kwargs, output) -> None:
            if not call:
                return
            recording.count_mask(call["mask"])
            if not recording.wants_tensors:
                return
            if "hidden" not in call:
                raise RuntimeError("the output layer did not run inside the model's call")
            if not torch.is_tensor(output) or output.shape != call["targets"].transpose(0, 1).shape:
                raise TypeError(f"the model returned {type(output).__name__} {getattr(output, 'shape', '')},"
                                " not the per-token loss [b, s]")
            recording.counted = call["mask"].detach().transpose(0, 1)  # (S, B)
            recording.capture(hidden=call["hidden"], weight=local_weight(call["weight"]).detach().clone(),
                              targets=call["targets"], loss=output, contract=self.contract, replay=self._replay)

        recording.keep(self.model.register_forward_pre_hook(recording.guard(before_model), with_kwargs=True))
        recording.keep(self.model.output_layer.register_forward_pre_hook(recording.guard(before_output),
                                                                         with_kwargs=True))
        recording.keep(self.model.register_forward_hook(recording.guard(after_model), with_kwargs=True))
        if recording.terms:
            recording.keep(_LossWatch(self.model, recording.guard(mtp_loss)))
        return recording

    def _replay(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The model's own output layer and loss on a weight copy (``ColumnParallelLinear`` takes the weight as an
        argument, as it does for a shared embedding); ``forward`` directly, so no module hook runs again."""
        logits, _ = self.model.output_layer.forward(hidden, weight=weight)          # (S, B, V/TP)
        return self.model.compute_language_model_loss(targets.transpose(0, 1), logits).transpose(0, 1)  # (S, B)


class _LossWatch:
    """``compute_language_model_loss`` wrapped on the model instance (the class is untouched): the same losses
    returned, each shown to ``watch`` first; ``remove`` drops the wrapper. MTP's losses pass here and nowhere else."""

    def __init__(self, model: LanguageModule, watch: Any) -> None:
        self.model, original = model, model.compute_language_model_loss

        def compute_language_model_loss(labels, logits, *args, **kwargs):
            losses = original(labels, logits, *args, **kwargs)
            watch(losses)
            return losses

        model.__dict__["compute_language_model_loss"] = compute_language_model_loss

    def remove(self) -> None:
        self.model.__dict__.pop("compute_language_model_loss", None)
