"""Count the bytes of tensors that ops create while a function runs: the peak live total and the largest one.

CPU tensors escape tracemalloc and CUDA allocator stats, so this watches every op output through a
TorchDispatchMode and frees its bytes when the tensor is garbage collected. Inputs are not counted.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class AllocationStats:
    peak_bytes: int = 0
    largest_bytes: int = 0
    live_bytes: int = 0


class AllocationProbe(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.stats = AllocationStats()
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def ignore(self, *tensors: torch.Tensor | None) -> None:
        """Existing tensors whose views (``detach``, ``reshape``) an op may return: they are not new bytes."""
        self._seen.update(t.untyped_storage().data_ptr() for t in tensors if t is not None)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self._seen:
            return  # a view of something already counted, or an empty tensor
        size = storage.nbytes()
        self._seen.add(key)
        self.stats.live_bytes += size
        self.stats.largest_bytes = max(self.stats.largest_bytes, size)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.live_bytes)
        weakref.finalize(t, self._release, key, size)  # the op's output owns the new storage

    def _release(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.stats.live_bytes -= size
