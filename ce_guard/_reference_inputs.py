"""The reference's inputs checked against the contract before any math runs: a bad shape, dtype, target or
vocab partition raises here with the field, what was expected and what was found."""

from __future__ import annotations

import torch

from ce_guard import _dist
from ce_guard.contract import CEContract


def validate_reference_inputs(hidden, weight, targets, contract, grad_output, chunk_elements, token_chunk, backward_dtype) -> None:
    if not isinstance(contract, CEContract):
        raise TypeError(f"`contract` must be a CEContract, got {type(contract).__name__}.")
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise ValueError(f"`hidden` and `weight` must be floating point, got {hidden.dtype} and {weight.dtype}.")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"`hidden` ({hidden.dtype}) and `weight` ({weight.dtype}) must share a dtype, as the"
                         " output layer's matmul does; cast one of them before the check.")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise ValueError(f"`targets` must be an integer tensor of class ids, got {targets.dtype}.")
    if hidden.dim() < 2 or hidden.shape[:-1] != targets.shape:
        raise ValueError(f"`hidden` must be [..., D] with leading shape equal to targets' {tuple(targets.shape)},"
                         f" got {tuple(hidden.shape)}.")
    if weight.dim() != 2 or weight.shape != (contract.vocab_slice_size, hidden.shape[-1]):
        raise ValueError(f"`weight` must be this rank's vocab slice [{contract.vocab_start}, {contract.vocab_end}) as"
                         f" ({contract.vocab_slice_size}, {hidden.shape[-1]}), got {tuple(weight.shape)}.")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"`hidden`, `weight` and `targets` must be on one device, got {hidden.device},"
                         f" {weight.device} and {targets.device}.")
    bad = (targets != contract.ignore_index) & ((targets < 0) | (targets >= contract.vocab_size))
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"targets must be in [0, {contract.vocab_size}) or ignore_index={contract.ignore_index};"
                         f" found {int(targets[first])} at {first} ({int(bad.sum())} such targets).")
    if chunk_elements < 1 or token_chunk < 1:
        raise ValueError(f"`chunk_elements` and `token_chunk` must be >= 1, got {chunk_elements} and {token_chunk}.")
    if backward_dtype not in (None, torch.float16, torch.float32):
        raise ValueError(f"`backward_dtype` must be None, torch.float16 or torch.float32, got {backward_dtype}.")
    if grad_output is not None and contract.reduction != "none" and not _is_scalar(grad_output):
        raise ValueError(f"`grad_output` must be a scalar for reduction={contract.reduction!r}.")
    tp_size = _dist.group_size(contract.tp_group)
    if tp_size == 1 and not contract.is_full_vocab:
        raise ValueError(f"the weight slice [{contract.vocab_start}, {contract.vocab_end}) is not the whole vocabulary"
                         f" ({contract.vocab_size}) but the TP group has one rank; pass the TP group in the contract.")
    if tp_size > 1:
        _check_partition_tiles(contract, weight.device)


def _is_scalar(x) -> bool:
    return isinstance(x, (int, float)) or (isinstance(x, torch.Tensor) and x.numel() == 1)


def _check_partition_tiles(contract: CEContract, device: torch.device) -> None:
    """The TP ranks' slices must tile [0, V) in rank order; otherwise every formula downstream is wrong."""
    tp = contract.tp_group
    mine = torch.tensor([[contract.vocab_start, contract.vocab_end]], dtype=torch.int64, device=device)
    slices = _dist.all_gather_dim0(mine, tp).tolist()
    expected_start = 0
    for rank, (start, end) in enumerate(slices):
        if start != expected_start:
            raise ValueError(f"vocab slices over the TP group {slices} do not tile [0, {contract.vocab_size}):"
                             f" rank {rank} starts at {start}, expected {expected_start}.")
        expected_start = end
    if expected_start != contract.vocab_size:
        raise ValueError(f"vocab slices over the TP group {slices} end at {expected_start}, not at"
                         f" vocab_size={contract.vocab_size}.")
