"""Transformer Engine's ``parallel_cross_entropy`` behind ce_guard's interface (what Megatron runs with
``cross_entropy_fusion_impl="te"``), declaring the contract it keeps and checksumming what it is handed.

Kept apart from :mod:`ce_guard.adapters` for length; imported from there.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from ce_guard._dist import all_reduce, group_rank, group_size
from ce_guard.contract import CEContract
from ce_guard.fused import make_output_weight
from ce_guard.input_checksums import InputChecksums

__all__ = ["TransformerEngineCrossEntropy"]

ParallelCrossEntropy = Callable[..., torch.Tensor]


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward sums dL/dh over the TP group (each vocab slice gives its share)."""

    @staticmethod
    def forward(ctx, hidden, group):
        ctx.group = group
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce(grad.clone(), dist.ReduceOp.SUM, ctx.group), None


def _load_parallel_cross_entropy(owner: str) -> ParallelCrossEntropy:
    try:
        return importlib.import_module("transformer_engine.pytorch.cross_entropy").parallel_cross_entropy
    except ImportError as error:
        raise ImportError(f"{owner} needs Transformer Engine's `transformer_engine.pytorch.cross_entropy`, which is"
                          f" not importable ({error}). Install it with: pip install 'ce_guard[te]', or pass"
                          " `parallel_cross_entropy=` explicitly.") from error


class TransformerEngineCrossEntropy(nn.Module):
    """hidden ``[.., D]`` and this rank's weight slice -> logits -> TE's ``parallel_cross_entropy`` -> loss.

    The logits are ``hidden @ weight.T`` in the input dtype, handed to TE as ``[S, B, V/TP]`` (hidden ``[S, B, D]``;
    ``[N, D]`` becomes ``[N, 1, D]``). ``reduction="none"`` is TE's ``reduce_loss=False`` (per-token losses, in
    the targets' shape); ``"mean"`` is ``reduce_loss=True``, a mean over this rank's non-ignored tokens. Label
    smoothing is PyTorch's formula over the global V. Under TP each rank holds an equal ``[V/TP, D]`` slice in rank
    order, as TE requires, and dL/dh is summed over ``tp_group``.

    A call made with ``checksum_inputs`` set (the guard sets it on the call it records) checksums the hidden
    states, the weight and the logits before TE's forward and again once its backward has written dL/dlogits
    (``input_checksums``, which the seam's record carries to the check): TE up to 2.17 writes that gradient into the
    logits' storage (docs/faults.md #18). Other calls checksum nothing (a checksum reads every logit and syncs).

    Args:
        hidden_size: D.
        vocab_size: the global V; the TP size must divide it.
        tp_group: the tensor-parallel group TE all-gathers its statistics over; None for one rank.
        weight: this rank's ``[V/TP, D]`` slice to borrow; a fresh one otherwise.
        transpose_logits: compute ``[B, S, V/TP]`` logits from batch-first hidden ``[B, S, D]`` and hand TE their
            non-contiguous ``[S, B, V/TP]`` transpose, as a batch-first model calling a sequence-first loss does.
        parallel_cross_entropy: TE's function (a pinned version's, in tests); imported from TE when None.

    Example:
        >>> layer = TransformerEngineCrossEntropy(1024, 32768, reduction="none", tp_group=tp_group)
        >>> per_token = layer(hidden, targets)  # hidden (S, B, D), targets (S, B)
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, reduction: str = "mean", label_smoothing: float = 0.0,
                 ignore_index: int = -100, tp_group: dist.ProcessGroup | None = None,
                 weight: nn.Parameter | None = None, transpose_logits: bool = False,
                 parallel_cross_entropy: ParallelCrossEntropy | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        if reduction not in ("none", "mean"):
            raise ValueError(f"{owner}: `reduction` must be 'none' or 'mean' (TE's reduce_loss False or True), got"
                             f" {reduction!r}. Sum the per-token losses of reduction='none' yourself.")
        tp, rank = group_size(tp_group), group_rank(tp_group)
        if vocab_size % tp:
            raise ValueError(f"{owner}: TE needs equal vocab slices, so the TP size {tp} must divide `vocab_size`="
                             f"{vocab_size}; pad the vocabulary to a multiple of {tp}.")
        start, end = rank * vocab_size // tp, (rank + 1) * vocab_size // tp
        self.parallel_cross_entropy = parallel_cross_entropy or _load_parallel_cross_entropy(owner)
        self.weight = make_output_weight(hidden_size, end - start, weight, owner=owner, device=device, dtype=dtype)
        self.tp_group, self.transpose_logits = tp_group, transpose_logits
        self.ce_contract = CEContract(vocab_size=vocab_size, reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, accum_dtype=torch.float32,
                                      layout="[S,B,V/TP]" if tp > 1 else "[N,V]", vocab_start=start, vocab_end=end,
                                      tp_group=tp_group)
        self.checksum_inputs = False  # set by the guard for the call it records
        self.input_checksums: InputChecksums | None = None

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        contract = self.ce_contract
        hidden_3d = hidden if hidden.dim() == 3 else hidden.reshape(-1, 1, hidden.shape[-1])  # (S, B, D) or (B, S, D)
        labels = targets.reshape(hidden_3d.shape[:-1])                                         # (S, B) or (B, S)
        inputs = _CopyToTensorParallel.apply(hidden_3d, self.tp_group) if group_size(self.tp_group) > 1 else hidden_3d
        logits = inputs @ self.weight.T                                                       # (S, B, V/TP)
        handed, handed_labels = logits, labels
        if self.transpose_logits:  # batch-first logits, handed sequence-first as a strided view
            handed, handed_labels = logits.transpose(0, 1), labels.transpose(0, 1)             # (S, B, V/TP), (S, B)
        checks = InputChecksums.of(hidden=hidden, weight=self.weight, logits=handed) if self.checksum_inputs else None
        args = [handed, handed_labels, contract.label_smoothing, contract.reduction == "mean", self.tp_group]
        if contract.ignore_index != -100:  # TE 2.4-2.5 take ignore_idx but return one gradient too few for it
            args.append(contract.ignore_index)
        loss = self.parallel_cross_entropy(*args)
        if checks is not None:
            self.input_checksums = checks.measured_after(hidden=hidden, weight=self.weight, logits=handed)
            if handed.requires_grad:  # again once TE's backward has produced dL/dlogits
                handed.register_hook(lambda grad: self._measure_after(checks, hidden, handed))
        if contract.reduction == "none":
            loss = loss.transpose(0, 1) if self.transpose_logits else loss                    # (S, B) -> labels'
            return loss.reshape(targets.shape)
        return loss

    def _measure_after(self, checks: InputChecksums, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        self.input_checksums = checks.measured_after(hidden=hidden, weight=self.weight, logits=logits)
