"""flash-linear-attention's output losses behind ce_guard's interface: its fused linear cross-entropy
(``fla.modules.FusedLinearCrossEntropyLoss``) and the unfused cross-entropy its models wrap in ``l2_warp``, each
declaring the contract it keeps, the L2-warp penalty included.

Kept apart from :mod:`ce_guard.adapters` for length; imported from there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ce_guard.contract import CEContract, Reduction
from ce_guard.fused import make_output_weight

__all__ = ["FlaFusedLinearCrossEntropy", "FlaL2WarpCrossEntropy"]

L2Warp = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _load(module: str, name: str, owner: str):
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as error:
        raise ImportError(f"{owner} needs flash-linear-attention's `{module}.{name}`, which is not importable"
                          f" ({error}). Install it with: pip install fla-core, or pass it explicitly.") from error


def _check_reduction(reduction: str, owner: str) -> None:
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{owner}: `reduction` must be 'mean' or 'sum' (fla's fused loss has no 'none'), got"
                         f" {reduction!r}.")


class FlaFusedLinearCrossEntropy(nn.Module):
    """hidden ``[.., D]`` -> fla's ``FusedLinearCrossEntropyLoss(x, target, weight)`` -> loss.

    fla chunks over tokens, keeps each row's lse in fp32 and accumulates dL/dW in fp32, computing every gradient
    in the forward. Its ``mean`` divides by this rank's non-ignored tokens. With ``l2_warp`` set it adds the
    L2-warp penalty's gradient (``use_l2warp=True, l2_penalty_factor=l2_warp``) on every row, averaged over every
    row as ``fla.modules.l2warp.l2_warp`` defines it: the contract declares ``l2_warp_rows='all'``.

    Args:
        hidden_size: D.
        vocab_size: V.
        weight: a ``[V, D]`` weight to borrow; a fresh one otherwise.
        l2_warp: the L2-warp penalty factor; 0 turns it off.
        num_chunks: fla's token chunks.
        loss_class: ``FusedLinearCrossEntropyLoss`` (a pinned version's, in tests); imported from fla when None.

    Example:
        >>> layer = FlaFusedLinearCrossEntropy(1024, 32768, l2_warp=1e-4)
        >>> loss = layer(hidden, targets)  # hidden (B, T, D), targets (B, T)
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, weight: nn.Parameter | None = None,
                 reduction: Reduction = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                 l2_warp: float = 0.0, num_chunks: int = 8, loss_class: type[nn.Module] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_reduction(reduction, owner)
        loss_class = loss_class or _load("fla.modules", "FusedLinearCrossEntropyLoss", owner)
        self.weight = make_output_weight(hidden_size, vocab_size, weight, owner=owner, device=device, dtype=dtype)
        self.ce_contract = CEContract(vocab_size=vocab_size, reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, l2_warp=l2_warp, l2_warp_rows="all",
                                      accum_dtype=torch.float32)
        self.loss = loss_class(ignore_index=ignore_index, label_smoothing=label_smoothing, num_chunks=num_chunks,
                               reduction=reduction, use_l2warp=bool(l2_warp), l2_penalty_factor=l2_warp)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, D), (N,)
        return self.loss(flat_hidden, flat_targets, self.weight)


class FlaL2WarpCrossEntropy(nn.Module):
    """hidden ``[.., D]`` -> logits ``hidden @ weight.T`` -> PyTorch's cross-entropy in fp32 -> fla's
    ``l2_warp(loss, logits, l2_warp)``, as fla's models compute their loss with ``fuse_linear_cross_entropy=False``
    and ``use_l2warp=True``. The penalty averages over every row (``B*T``): ``l2_warp_rows='all'``.

    Args:
        hidden_size: D.
        vocab_size: V.
        weight: a ``[V, D]`` weight to borrow; a fresh one otherwise.
        l2_warp: the L2-warp penalty factor (fla's ``l2_penalty_factor``, default 1e-4 there); must be > 0.
        l2_warp_fn: ``fla.modules.l2warp.l2_warp`` (a pinned version's, in tests); imported from fla when None.
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, weight: nn.Parameter | None = None,
                 reduction: Reduction = "mean", ignore_index: int = -100, l2_warp: float = 1e-4,
                 l2_warp_fn: L2Warp | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        _check_reduction(reduction, owner)
        if not l2_warp > 0:
            raise ValueError(f"{owner}: `l2_warp` must be > 0 (the penalty this adapter wraps), got {l2_warp!r}."
                             " Use TorchLinearCrossEntropy for a plain cross-entropy.")
        self.l2_warp_fn = l2_warp_fn or _load("fla.modules.l2warp", "l2_warp", owner)
        self.weight = make_output_weight(hidden_size, vocab_size, weight, owner=owner, device=device, dtype=dtype)
        self.ce_contract = CEContract(vocab_size=vocab_size, reduction=reduction, ignore_index=ignore_index,
                                      l2_warp=l2_warp, l2_warp_rows="all", accum_dtype=torch.float32)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        contract = self.ce_contract
        logits = hidden.reshape(-1, hidden.shape[-1]) @ self.weight.T                      # (N, V), input dtype
        # fp32 from here, as the loss is: fla 0.5's l2_warp scatters the max logit into a tensor of the loss's dtype
        # and fails on bf16 logits beside an fp32 loss. The upcast keeps the input dtype's values, ties included.
        logits = logits.float()
        loss = F.cross_entropy(logits, targets.reshape(-1), ignore_index=contract.ignore_index,
                               reduction=contract.reduction)
        return self.l2_warp_fn(loss, logits.unsqueeze(0), contract.l2_warp)              # logits as (1, N, V)
