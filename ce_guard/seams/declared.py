"""One line in the user's own loss code declares the seam: ``loss = ce_guard.seam(hidden, weight, targets, fn, contract)``.

The call computes ``fn(hidden, weight, targets)`` and returns it unchanged. Only on a check step, when the
callback has a recording waiting, does it also count the call's tokens and record the sampled one; dL/dW is replayed through ``fn`` on a copy of
the weight, so a borrowed or tied weight is measured and training's ``.grad`` is untouched. Any other step
pays one attribute lookup.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ce_guard.contract import CEContract
from ce_guard.recording import SeamRecording, local_weight

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

_waiting: SeamRecording | None = None  # set by DeclaredSeam.record on a check step, cleared by its removal


def seam(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, loss_fn: LossFn,
         contract: CEContract, *, given_count: float | None = None) -> torch.Tensor:
    """Return ``loss_fn(hidden, weight, targets)``, recorded for ``CEParityCallback`` on its check steps.

    Args:
        hidden: the head's input, ``[..., D]``, as the loss function receives it.
        weight: the head's weight ``[V, D]`` (a parameter, tied or borrowed; an FSDP2 DTensor is gathered).
        targets: ids of hidden's leading shape, already shifted; ``contract.ignore_index`` marks padding.
        loss_fn: computes the loss from the three: a materialised ``F.cross_entropy``, your kernel or a peer's.
        contract: what ``loss_fn`` promises (:class:`ce_guard.CEContract`).
        given_count: the divisor of a ``normalize_by="given_count"`` contract (e.g. ``num_items_in_batch``).

    Example:
        >>> loss = seam(h, head.weight, y, lambda h, w, y: F.cross_entropy(h @ w.T, y), CEContract(vocab_size=V))  # doctest: +SKIP
    """
    loss = loss_fn(hidden, weight, targets)
    recording = _waiting
    if recording is not None:
        recording.guard(_capture)(recording, hidden, weight, targets, loss, loss_fn, contract, given_count)
    return loss


def _capture(recording, hidden, weight, targets, loss, loss_fn, contract, given_count) -> None:
    if not isinstance(contract, CEContract):
        raise TypeError(f"ce_guard.seam needs a CEContract, got {type(contract).__name__}")
    recording.count(targets, contract.ignore_index)
    if not recording.wants_tensors:
        return
    full = local_weight(weight)
    replay = None if full is not weight else loss_fn  # a sharded weight is not replayed on one rank's schedule
    recording.capture(hidden=hidden, weight=full.detach().clone(), targets=targets, loss=loss, contract=contract,
                      given_count=None if given_count is None else float(given_count), replay=replay)


class DeclaredSeam:
    """The seam that :func:`seam` declares wherever the user's loss code calls it."""

    contract = None  # known only once the call has run

    def describe(self) -> str:
        return "the `ce_guard.seam(...)` call in your loss code"

    def record(self) -> SeamRecording:
        global _waiting
        recording = _WaitingRecording()
        _waiting = recording
        return recording


class _WaitingRecording(SeamRecording):
    """A recording that the next :func:`seam` call fills; removing it stops the wait."""

    def remove(self) -> None:
        global _waiting
        if _waiting is self:
            _waiting = None
        super().remove()
