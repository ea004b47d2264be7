"""ce_guard's fused layer committing one seam fault while it keeps declaring its honest contract.

Each fault is ce_guard's own chunk math with one decision broken (:class:`ce_guard.fused_chunk.ChunkRules`)
or computed for another contract than the declared one: exactly what the guard must catch. Every fault
runs the plain-torch chunk math, never the CUDA kernels, so its numbers are those its signature in
docs/faults.md was measured on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ce_guard._dist import all_reduce
from ce_guard.contract import CEContract
from ce_guard.fused import FusedLinearCrossEntropy
from ce_guard.fused_chunk import ChunkMath, ChunkRules, TargetRows
from ce_guard.testing.injections import switches

__all__ = ["LAYER_FAULTS", "FaultyFusedLinearCrossEntropy", "faulty_chunk_math", "fused_layer"]

LAYER_FAULTS = switches(layer=True)


class _TorchMath(ChunkRules):
    """The honest decisions, kept on the plain-torch chunk math where the faults' signatures were measured."""

    kernel_allowed = False


class _ScaledLoss(_TorchMath):
    """Loss and gradients times ``k``, applied before any rounding."""

    def __init__(self, k: float) -> None:
        self.loss_scale = k


class _ClampedTargets(_TorchMath):
    """Every rank claims every visible target, clamped into its slice instead of masked."""

    def locate_targets(self, targets: torch.Tensor, m: ChunkMath) -> TargetRows:
        local = targets - m.vocab_start
        return TargetRows(local.clamp(0, m.vocab_slice_size - 1), targets != m.ignore_index)


class _SliceOffByOne(_TorchMath):
    """The slice also admits target == vocab_end (the next rank's first id), read from its own last row."""

    def locate_targets(self, targets: torch.Tensor, m: ChunkMath) -> TargetRows:
        local = targets - m.vocab_start
        last = m.vocab_slice_size - 1
        owned = (targets != m.ignore_index) & (local >= 0) & (local <= last + 1)
        return TargetRows(torch.where(owned, local, 0).clamp(max=last), owned)


class _PaddingCounted(_TorchMath):
    """A mean divides by every token, ignored ones included."""

    def counted(self, targets: torch.Tensor, m: ChunkMath) -> torch.Tensor:
        return torch.ones_like(targets, dtype=torch.bool)


class _LocalSmoothing(_TorchMath):
    """Label smoothing's uniform term over this rank's V/TP (Megatron's local partition mean)."""

    def smoothing_vocab(self, m: ChunkMath) -> int:
        return m.vocab_slice_size

    def mean_logit(self, slice_sum: torch.Tensor, global_sum: torch.Tensor, m: ChunkMath) -> torch.Tensor:
        return slice_sum / m.vocab_slice_size


class _DenominatorSummedTwice(_TorchMath):
    """The already reduced denominator summed over TP again, as if the logits had been gathered first."""

    def denominator(self, summed: torch.Tensor, m: ChunkMath) -> torch.Tensor:
        return all_reduce(summed.clone(), dist.ReduceOp.SUM, m.tp_group)


_TORCH_MATH = _TorchMath()

# switch -> (declared contract, fault_scale) -> what the layer computes instead
_BREAKS: dict[str, Callable[[CEContract, float], ChunkMath]] = {
    "local_normalization": lambda c, k: ChunkMath.of(dataclasses.replace(c, normalize_by="local_tokens"),
                                                     _TORCH_MATH),
    "grad_scale": lambda c, k: ChunkMath.of(c, _ScaledLoss(k)),
    "bf16_accumulators": lambda c, k: ChunkMath.of(dataclasses.replace(c, accum_dtype=torch.bfloat16), _TORCH_MATH),
    "unmasked_partition_targets": lambda c, k: ChunkMath.of(c, _ClampedTargets()),
    "partition_off_by_one": lambda c, k: ChunkMath.of(c, _SliceOffByOne()),
    "ignore_in_denominator": lambda c, k: ChunkMath.of(c, _PaddingCounted()),
    "smoothing_local_vocab": lambda c, k: ChunkMath.of(c, _LocalSmoothing()),
    "gathered_logits_log_tp": lambda c, k: ChunkMath.of(c, _DenominatorSummedTwice()),
    "missing_z_loss": lambda c, k: ChunkMath.of(dataclasses.replace(c, z_loss=0.0), _TORCH_MATH),
}


def faulty_chunk_math(contract: CEContract, fault: str, fault_scale: float = 2) -> ChunkMath:
    """What a layer declaring ``contract`` computes under ``fault`` (one of :data:`LAYER_FAULTS`)."""
    if fault not in LAYER_FAULTS:
        raise ValueError(f"`fault` must be one of {list(LAYER_FAULTS)}, got {fault!r}.")
    return _BREAKS[fault](contract, fault_scale)


class FaultyFusedLinearCrossEntropy(FusedLinearCrossEntropy):
    """:class:`~ce_guard.fused.FusedLinearCrossEntropy` computing ``fault``; ``ce_contract`` stays the honest one.

    Args:
        hidden_size: D, the last dim of ``hidden``.
        contract: the contract the layer declares (and breaks).
        fault: one of :data:`LAYER_FAULTS`, the layer's rows of ``ce_guard.testing.injections.INJECTIONS``.
        fault_scale: the k of ``grad_scale``: an integer for a divide missing or doubled, any other positive
            number for a divide by another count.
        weight, token_chunk, device, dtype: as for :class:`~ce_guard.fused.FusedLinearCrossEntropy`.

    Raises:
        ValueError: on an unknown fault or a ``fault_scale`` that is not a positive finite number, and
            where :class:`~ce_guard.fused.FusedLinearCrossEntropy` raises.

    Example:
        >>> head = FaultyFusedLinearCrossEntropy(64, CEContract(vocab_size=1000), fault="grad_scale")
        >>> loss = head(torch.randn(4, 16, 64), torch.randint(0, 1000, (4, 16)))  # twice the honest loss
    """

    def __init__(self, hidden_size: int, contract: CEContract, *, fault: str, fault_scale: float = 2,
                 weight: nn.Parameter | None = None, token_chunk: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        owner = type(self).__name__
        if fault not in LAYER_FAULTS:
            raise ValueError(f"{owner}: `fault` must be one of {list(LAYER_FAULTS)}, got {fault!r}.")
        if isinstance(fault_scale, bool) or not isinstance(fault_scale, (int, float)) or not 0 < fault_scale < math.inf:
            raise ValueError(f"{owner}: `fault_scale` must be a positive finite number, got {fault_scale!r}.")
        super().__init__(hidden_size, contract, weight=weight, token_chunk=token_chunk, device=device, dtype=dtype)
        self.fault = fault
        self.fault_scale = fault_scale
        self._math = faulty_chunk_math(contract, fault, fault_scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fault={self.fault}"


def fused_layer(hidden_size: int, contract: CEContract, *, fault: str | None = None, fault_scale: float = 2,
                **kwargs) -> FusedLinearCrossEntropy:
    """ce_guard's fused layer declaring ``contract``: the honest one, or with ``fault`` the faulty one.

    ``kwargs`` (``weight``, ``token_chunk``, ``device``, ``dtype``) go to the layer.
    """
    if fault is None:
        return FusedLinearCrossEntropy(hidden_size, contract, **kwargs)
    return FaultyFusedLinearCrossEntropy(hidden_size, contract, fault=fault, fault_scale=fault_scale, **kwargs)
