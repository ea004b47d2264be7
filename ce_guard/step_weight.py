"""The training contract: what weight each micro-batch's loss must carry in the optimizer step's gradient.

The seam check takes the gradient that reached the seam's loss (its upstream) as given and holds the layer under
it. What happens between the loss and the optimizer is the training loop's: a ``loss * 2`` in ``training_step``,
an accumulation divide missing or fixed where the window's tokens should weigh alike, a short last window divided
by the full window's count. This module holds that upstream to a declared :class:`TrainingContract`, from the
counts of the accumulation window the guard saw, and reports the recorded micro-batch's weight found and expected
(:class:`StepWeight`); ``ce_guard.diagnosis`` names a mismatch.

The weight of a micro-batch is what its mean loss per counted token is multiplied by in the step's gradient,
before the data-parallel reduction: the sum of its tokens' weights (dLoss/dtoken loss times the upstream), with an
AMP loss scale divided out.

A loss term beside the seam (:class:`LossTerm`: a Megatron MTP depth, whose per-token loss enters the graph below
the seam) is held to the same contract on its own counted tokens, its declared weight divided out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from ce_guard.contract import CEContract

Weighting = Literal["micro_batch_mean", "window_tokens", "global_tokens"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
DataParallel = Literal["mean", "sum"]

# How far a found weight may sit from the expected one: the upstream's own rounding (one division in the loss's
# dtype, a few in fp32 sums), far under the smallest factor a training loop's mistake gives.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
_TOLERANCE_16_BIT = 2.0 ** -7


@dataclass(frozen=True)
class TrainingContract:
    """How the optimizer step's gradient weighs each micro-batch's loss.

    Args:
        weighting: ``micro_batch_mean``: each micro-batch's mean loss weighs 1/m, m the micro-batches of the
            accumulation window (a mean of means: Lightning's divide by ``accumulate_grad_batches``);
            ``window_tokens``: every counted token of the window weighs alike (the window's summed loss over
            its counted tokens: transformers' ``num_items_in_batch``); ``global_tokens``: alike over the
            data-parallel group's windows too (transformers' ``average_tokens_across_devices``).
        data_parallel: how the data-parallel gradient reduction combines ranks: ``mean`` (DDP, FSDP by default)
            or ``sum``.

    Example:
        >>> TrainingContract("window_tokens")
        TrainingContract(weighting='window_tokens', data_parallel='mean')
    """

    weighting: Weighting = "micro_batch_mean"
    data_parallel: DataParallel = "mean"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"TrainingContract: `weighting` must be one of {WEIGHTINGS}, got {self.weighting!r}.")
        if self.data_parallel not in ("mean", "sum"):
            raise ValueError("TrainingContract: `data_parallel` must be 'mean' or 'sum' (how the data-parallel"
                             f" gradient reduction combines ranks), got {self.data_parallel!r}.")


def implied_training_contract(contract: CEContract) -> TrainingContract:
    """The training contract a seam's own contract implies: a mean over the data-parallel group's tokens for
    ``normalize_by='global_tokens'`` (reduced as its ``grad_sync`` says), the window's tokens for a given count
    (transformers' ``num_items_in_batch``), else a mean of the window's micro-batch means (Lightning's divide).

    Example:
        >>> implied_training_contract(CEContract(vocab_size=8)).weighting
        'micro_batch_mean'
    """
    data_parallel = "mean" if contract.grad_sync == "average" else "sum"
    if contract.reduction == "mean" and contract.normalize_by == "global_tokens":
        return TrainingContract("global_tokens", data_parallel)
    if contract.reduction == "mean" and contract.normalize_by == "given_count":
        return TrainingContract("window_tokens", data_parallel)
    return TrainingContract("micro_batch_mean", data_parallel)


@dataclass(frozen=True)
class LossTerm:
    """A term of the step's loss beside the seam, held to the training contract as its per-token loss averaged over
    its own counted tokens, times ``weight`` (a Megatron MTP depth: ``mtp_loss_scaling_factor / mtp_num_layers``
    over the loss mask rolled by its depth). The main loss's counts are kept because a term divided by them, not
    by its own, is a fault the diagnosis names.

    Args:
        name: how the diagnosis calls the term (``"MTP depth 1"``).
        weight: the term's declared weight in the step's loss.
        main_tokens: the main loss's counted tokens in the recorded micro-batch.
        main_window_tokens: the main loss's counted tokens in the window, on this rank.
        main_global_tokens: the main loss's counted tokens over the data-parallel group.
    """

    name: str
    weight: float
    main_tokens: int
    main_window_tokens: int
    main_global_tokens: int


@dataclass(frozen=True)
class StepWindow:
    """What the training loop did around the recorded micro-batch: its accumulation window, on this rank.

    Args:
        micro_batches: micro-batches the window accumulated (fewer than ``accumulate`` in a short last window).
        accumulate: the configured accumulation, the count a fixed divide uses.
        window_tokens: counted tokens (targets not ignored) of the window's micro-batches on this data-parallel rank.
        global_tokens: counted tokens of the windows of the whole data-parallel group.
        dp_size: ranks the data-parallel reduction combines.
        loss_scale: the AMP loss scale the upstream carries (1 without one).
        loss_dtype: the dtype of the loss the upstream reached; its rounding sets the tolerance.
        term: the loss term these counts are of; None for the seam's own loss.
    """

    micro_batches: int
    accumulate: int
    window_tokens: int
    global_tokens: int
    dp_size: int = 1
    loss_scale: float = 1.0
    loss_dtype: torch.dtype = torch.float32
    term: LossTerm | None = None


@dataclass(frozen=True)
class StepWeight:
    """The recorded micro-batch's weight in the step's gradient: found, and as the training contract says."""

    weighting: str
    found: float
    expected: float
    factor: float      # found / expected
    tolerance: float   # |factor - 1| beyond this is a mismatch
    tokens: int        # counted tokens of the recorded micro-batch
    window_tokens: int
    global_tokens: int
    micro_batches: int
    accumulate: int
    dp_size: int
    term: LossTerm | None = None  # the loss term weighed; None for the seam's own loss

    @property
    def off(self) -> bool:
        return not abs(self.factor - 1) <= self.tolerance

    def close(self, found: float) -> bool:
        """Whether the found weight is ``found``, to the upstream's rounding."""
        return abs(self.found - found) <= self.tolerance * abs(found)


def step_weight(found: float, tokens: int, window: StepWindow, contract: TrainingContract) -> StepWeight:
    """Hold ``found`` (the recorded micro-batch's summed token weights, with the loss scale) to ``contract``.

    Args:
        found: the sum of dTotal/dtoken loss over the micro-batch's counted tokens, as the backward delivered it
            (a term's declared weight still in it).
        tokens: the micro-batch's counted tokens on this data-parallel rank.
        window: the accumulation window's counts.
        contract: the training contract.
    """
    if window.micro_batches < 1 or tokens > window.window_tokens or window.window_tokens > window.global_tokens:
        raise ValueError(f"inconsistent window counts: {tokens} tokens in a window of {window.window_tokens}"
                         f" ({window.micro_batches} micro-batches), {window.global_tokens} over the group")
    if contract.weighting == "micro_batch_mean":
        expected = 1.0 / window.micro_batches
    elif contract.weighting == "window_tokens":
        expected = tokens / max(window.window_tokens, 1)
    else:
        expected = tokens * window.dp_size / max(window.global_tokens, 1)
    if contract.data_parallel == "sum":
        expected /= window.dp_size
    found /= window.loss_scale * (window.term.weight if window.term is not None else 1.0)
    tolerance = _TOLERANCE.get(window.loss_dtype, _TOLERANCE_16_BIT)
    factor = found / expected if expected > 0 else (1.0 if found == 0 else float("inf"))
    return StepWeight(weighting=contract.weighting, found=found, expected=expected, factor=factor,
                      tolerance=tolerance, tokens=tokens, window_tokens=window.window_tokens,
                      global_tokens=window.global_tokens, micro_batches=window.micro_batches,
                      accumulate=window.accumulate, dp_size=window.dp_size, term=window.term)
