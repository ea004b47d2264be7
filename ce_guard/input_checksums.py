"""Checksums of the tensors a loss path is handed, before and after its forward and backward: did it write into them?

A loss path that overwrites its inputs in place (logits turned into probabilities, dL/dlogits written into the
logits' storage) can return a right loss and right gradients while anything that reads those tensors later sees
garbage (docs/faults.md #18, ``input_mutation``). The checksum reads the tensor's bits as integers, so it is exact
and deterministic: the same bits give the same sum on any device, and any changed bit changes it (up to a
collision in 2**64). A position weight makes a permutation of the values show too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["InputChecksums", "checksum"]

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(tensor: torch.Tensor) -> int:
    """An exact fingerprint of ``tensor``'s values: its bits as integers, summed with and without a position weight.

    Example:
        >>> x = torch.arange(6.0)
        >>> checksum(x) == checksum(x.clone()), checksum(x) == checksum(x.flip(0))
        (True, False)
    """
    flat = tensor.detach().reshape(-1)
    if flat.is_complex():
        flat = torch.view_as_real(flat).reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    bits = flat.contiguous().view(_BITS[flat.element_size()]).long()              # (numel,) one int per element
    position = torch.arange(1, bits.numel() + 1, device=bits.device) % 65521        # a prime: no power-of-2 aliasing
    both = torch.stack([bits.sum(), (bits * position).sum()])                       # int64, wraps: still exact
    low, high = both.tolist()
    return (low & 0xFFFFFFFF) | ((high & 0xFFFFFFFF) << 32)


@dataclass(frozen=True)
class InputChecksums:
    """The checksums of named inputs (``hidden``, ``weight``, ``logits``) before the loss path's forward and after
    its backward. ``changed`` names those that differ; an input missing from ``after`` was not measured again."""

    before: Mapping[str, int] = field(default_factory=dict)
    after: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, **tensors: torch.Tensor) -> "InputChecksums":
        """The ``before`` half, of each tensor given; call :meth:`measured_after` once backward has run."""
        return cls(before={name: checksum(t) for name, t in tensors.items()})

    def measured_after(self, **tensors: torch.Tensor) -> "InputChecksums":
        return InputChecksums(self.before, {**self.after, **{name: checksum(t) for name, t in tensors.items()}})

    def merged(self, other: "InputChecksums | None") -> "InputChecksums":
        if other is None:
            return self
        return InputChecksums({**self.before, **other.before}, {**self.after, **other.after})

    @property
    def changed(self) -> tuple[str, ...]:
        return tuple(name for name, value in self.before.items() if name in self.after and self.after[name] != value)
