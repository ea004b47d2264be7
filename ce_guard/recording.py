"""Record one forward and backward of a seam as a :class:`~ce_guard.check.SeamRecord`; no Trainer.

A seam source (:mod:`ce_guard.seams`) hooks the place where the seam's tensors pass and hands them to
:meth:`SeamRecording.capture`: hidden states, the weight, targets, the loss and the contract. Every call it sees
while installed is :meth:`~SeamRecording.count`-ed, so an accumulation window's tokens are known to the check. The recording
then hooks those tensors for what the real backward delivers (dL/dhidden and the upstream gradient); dL/dW is
replayed on the recorded inputs when the source can replay, so training's ``.grad`` is never read or touched.

A loss term that enters the graph beside the seam (a Megatron MTP depth) is a :class:`TermRecording` in the
recording's ``terms``: its counts and its per-token upstream, held to the training contract on its own counted tokens
(:meth:`SeamRecording.term_weights`). Where the training loop counts tokens by a mask of its own (Megatron's
``loss_mask``) rather than by the ignore index, ``counted`` holds it.

Every hook runs through :meth:`SeamRecording.guard`: an exception inside one becomes the recording's
``error`` (the callback reports a missed check), never an exception in the model's forward or backward.

Example::

    recording = ModuleSeam(model.output).record()
    model(tokens, targets).backward()
    recording.remove()
    result = check_seam(recording.to_record(replay_weight_grad=True), recording.contract)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ce_guard import _dist
from ce_guard.check import SeamRecord
from ce_guard.contract import CEContract
from ce_guard.input_checksums import InputChecksums
from ce_guard.parity import SeamOutputs
from ce_guard.step_weight import LossTerm, StepWeight, StepWindow, TrainingContract, step_weight

# (hidden, weight, targets) -> loss: the seam's loss computed again on a weight copy, for dL/dW.
Replay = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SeamRecording:
    """What one micro-batch's seam saw: filled by :meth:`capture` and by the tensor hooks it registers."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.contract: CEContract | None = None
        self.given_count: float | None = None
        self.grad_hidden: torch.Tensor | None = None
        self.upstream: torch.Tensor | None = None
        self.autocast_dtype: torch.dtype | None = None
        self.replay: Replay | None = None
        self.input_checksums: Callable[[], InputChecksums | None] | None = None  # read once the backward has run
        self.counted: torch.Tensor | None = None  # the tokens the training loop counts, where not the ignore index's
        self.terms: list[TermRecording] = []       # loss terms beside the seam, held to the training contract too
        self.training: TrainingContract | None = None  # the training contract the seam's own code implies, if any
        self.error: str | None = None
        self.finished_forward = False
        self.armed = True  # capture the next call; a window's other micro-batches are only counted
        self._window = _TokenTally()
        self._handles: list[Any] = []

    def guard(self, hook: Callable[..., Any]) -> Callable[..., None]:
        """``hook`` made safe for a model's forward or backward: it returns None and never raises; its
        first exception is kept as ``error`` and ends the recording."""

        @functools.wraps(hook)
        def guarded(*args, **kwargs) -> None:
            if self.error is not None:
                return
            try:
                hook(*args, **kwargs)
            except Exception as err:  # a guard must never break the training it guards
                self.error = f"{type(err).__name__}: {err}"
                self.finished_forward = True

        return guarded

    def keep(self, handle: Any) -> None:
        """Remember a hook handle, removed by :meth:`remove`."""
        self._handles.append(handle)

    @property
    def wants_tensors(self) -> bool:
        """Whether the seam's next call is the one to capture: armed, and none captured yet."""
        return self.armed and not self.finished_forward

    def count(self, targets: torch.Tensor, ignore_index: int) -> None:
        """Add one seam call's counted tokens (targets not ignored) to the window's; no host sync."""
        self._window.add(targets != ignore_index)

    def count_mask(self, mask: torch.Tensor) -> None:
        """Add one seam call's counted tokens where the training loop counts by a mask (nonzero: counted)."""
        self._window.add(mask != 0)

    def window_tokens(self) -> int:
        """Counted tokens over every seam call while the recording was installed, on this rank."""
        return self._window.total()

    def window(self, *, micro_batches: int, accumulate: int, dp_size: int, loss_scale: float = 1.0) -> StepWindow:
        """The accumulation window's counts around the recorded call: its counted tokens on this data-parallel rank
        (the TP group's sequence shards summed under SP) and over every rank (TP ranks count alike). A collective on
        every rank of the world, after the recording's backward."""
        tokens, world = self._group_counts([self.window_tokens()])
        return StepWindow(micro_batches=micro_batches, accumulate=accumulate, window_tokens=tokens[0],
                          global_tokens=world[0], dp_size=dp_size, loss_scale=loss_scale,
                          loss_dtype=self.upstream.dtype)

    def term_weights(self, window: StepWindow, training: TrainingContract) -> list[StepWeight]:
        """Each loss term's weight in the step against ``training``, on its own counts beside the seam's ``window``:
        one collective on every rank of the world (all terms at once), after the recording's backward.

        Raises:
            ValueError: a term that was not recorded or got no backward (after the collective, so no rank waits).
        """
        if not self.terms:
            return []
        counts = [term.window_tokens() for term in self.terms]
        found = [float(term.upstream.double().sum()) if term.upstream is not None else 0.0 for term in self.terms]
        tokens, world = self._group_counts(counts, found if self.contract.sequence_parallel else None)
        weights = []
        for term, mine, group, total in zip(self.terms, tokens, world, found):
            if term.problem() is not None:
                raise ValueError(f"{term.name}: {term.problem()}")
            sized = StepWindow(micro_batches=window.micro_batches, accumulate=window.accumulate, window_tokens=mine,
                               global_tokens=group, dp_size=window.dp_size, loss_scale=window.loss_scale,
                               loss_dtype=term.upstream.dtype,
                               term=LossTerm(term.name, term.weight, term.main_tokens, window.window_tokens,
                                             window.global_tokens))
            weights.append(step_weight(total, term.tokens, sized, training))
        return weights

    def _group_counts(self, counts: list[int], found: list[float] | None = None) -> tuple[list[int], list[int]]:
        """Token counts on this data-parallel rank (the TP group's sequence shards summed under SP) and over every
        rank (TP ranks count alike); under SP ``found`` is summed over the TP group in place, in the same call."""
        contract = self.contract
        tokens = torch.tensor([float(c) for c in counts] + list(found or []), dtype=torch.float64,
                              device=self.hidden.device)
        if contract.sequence_parallel:
            _dist.all_reduce(tokens, dist.ReduceOp.SUM, contract.tp_group)
        world = _dist.all_reduce(tokens.clone(), dist.ReduceOp.SUM, dist.group.WORLD) / _dist.group_size(
            contract.tp_group)
        if found is not None:
            found[:] = tokens[len(counts):].tolist()
        n = len(counts)
        return [int(t) for t in tokens[:n].tolist()], [round(float(t)) for t in world[:n].tolist()]

    def capture(self, *, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor,
                contract: CEContract, given_count: float | None = None, replay: Replay | None = None) -> None:
        """The seam's forward: ``weight`` already a detached copy (FSDP frees its unsharded weight after
        forward); the tensors are detached here and hooked for the backward."""
        if loss is None or not torch.is_tensor(loss):
            raise TypeError(f"the seam produced no loss tensor (got {type(loss).__name__})")
        if loss.numel() != 1 and contract.reduction != "none":
            raise ValueError(f"the contract says reduction={contract.reduction!r}, but the loss has shape"
                             f" {tuple(loss.shape)}")
        self.hidden, self.targets, self.weight = hidden.detach(), targets.detach(), weight
        self.loss, self.contract, self.given_count, self.replay = loss.detach(), contract, given_count, replay
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            self.autocast_dtype = torch.get_autocast_dtype(device_type)
        if hidden.requires_grad:
            self.keep(hidden.register_hook(self.guard(self._capture_grad_hidden)))
        if loss.requires_grad:
            self.keep(loss.register_hook(self.guard(self._capture_upstream)))
        self.finished_forward = True

    def _capture_grad_hidden(self, grad: torch.Tensor) -> None:
        self.grad_hidden = grad.detach().clone()

    def _capture_upstream(self, grad: torch.Tensor) -> None:
        self.upstream = grad.detach().clone()

    def remove(self) -> None:
        """Remove every hook this recording put on modules and tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def problem(self) -> str | None:
        """Why this recording cannot be checked, or None."""
        if self.error is not None:
            return f"recording the seam failed ({self.error})"
        if self.hidden is None:
            return "the guarded seam did not run on this micro-batch"
        if self.upstream is None or self.grad_hidden is None:
            return ("no backward reached the seam's loss and hidden states (was the seam's loss part of the"
                    " returned loss, and do the hidden states require grad?)")
        return None

    def to_record(self, replay_weight_grad: bool) -> SeamRecord:
        """The recorded seam; with ``replay_weight_grad`` and a replay, dL/dW from running the loss again."""
        grad_weight = self._replayed_weight_grad() if replay_weight_grad and self.replay is not None else None
        dtype = self.autocast_dtype or self.hidden.dtype  # what the seam's matmul actually consumed
        upstream = self.upstream if self.upstream.numel() > 1 else float(self.upstream)
        fused = SeamOutputs(loss=self.loss.float(), grad_hidden=self.grad_hidden, grad_weight=grad_weight)
        checksums = self.input_checksums() if self.input_checksums is not None else None
        return SeamRecord(hidden=self.hidden.to(dtype), weight=self.weight.to(dtype), targets=self.targets,
                          fused=fused, upstream=upstream, given_count=self.given_count, input_checksums=checksums,
                          counted=self.counted)

    def _replayed_weight_grad(self) -> torch.Tensor:
        """dL/dW of the seam's own loss on the recorded inputs, under the autocast the forward ran in."""
        weight = self.weight.clone().requires_grad_()
        autocast = self.autocast_dtype
        with torch.enable_grad(), torch.autocast(self.hidden.device.type, dtype=autocast or torch.float32,
                                                 enabled=autocast is not None):
            loss = self.replay(self.hidden, weight, self.targets)
            (grad_weight,) = torch.autograd.grad(loss, [weight], grad_outputs=self.upstream.to(loss.dtype).expand_as(loss))
        return grad_weight


class TermRecording:
    """A loss term beside the seam, sharing none of its tensors (a Megatron MTP depth): the tokens it counts on every
    call of the window, and on the recorded call the upstream gradient its per-token loss got. Its hooks run under
    the seam recording's ``guard``.

    Args:
        name: how a diagnosis calls it (``"MTP depth 1"``).
        weight: its declared weight in the step's loss (Megatron: ``mtp_loss_scaling_factor / mtp_num_layers``).
    """

    def __init__(self, name: str, weight: float) -> None:
        self.name, self.weight = name, weight
        self.upstream: torch.Tensor | None = None
        self.tokens = 0       # counted tokens of the recorded call
        self.main_tokens = 0  # the main loss's counted tokens in the same call
        self._window = _TokenTally()

    def count(self, mask: torch.Tensor) -> None:
        """One call's counted tokens (``mask`` nonzero); no host sync."""
        self._window.add(mask != 0)

    def window_tokens(self) -> int:
        return self._window.total()

    def capture(self, loss: torch.Tensor, mask: torch.Tensor, main_mask: torch.Tensor,
                guard: Callable[[Callable[..., Any]], Callable[..., None]]) -> Any:
        """The recorded call: its counts now, its per-token loss's upstream when the backward reaches it; returns
        the hook's handle (None where the loss needs no gradient)."""
        self.tokens, self.main_tokens = int((mask != 0).sum()), int((main_mask != 0).sum())
        if not loss.requires_grad:
            return None

        def upstream(grad: torch.Tensor) -> None:
            self.upstream = grad.detach().clone()

        return loss.register_hook(guard(upstream))

    def problem(self) -> str | None:
        if not self._window.calls:
            return "the term did not run while the seam was recorded"
        if self.upstream is None:
            return "no backward reached its per-token loss"
        return None


class _TokenTally:
    """Counted tokens per call, kept as device tensors and summed once asked: no host sync per call."""

    def __init__(self) -> None:
        self._per_call: list[torch.Tensor] = []

    @property
    def calls(self) -> int:
        return len(self._per_call)

    def add(self, counted: torch.Tensor) -> None:
        self._per_call.append(counted.detach().sum())

    def total(self) -> int:
        return int(torch.stack(self._per_call).sum()) if self._per_call else 0


def local_weight(weight: torch.Tensor) -> torch.Tensor:
    """This rank's weight slice as a plain tensor; a DTensor (fully_shard, parallelize_module) is gathered
    over its mesh, which costs nothing when it is already replicated."""
    full_tensor = getattr(weight, "full_tensor", None)
    return full_tensor() if full_tensor is not None else weight
