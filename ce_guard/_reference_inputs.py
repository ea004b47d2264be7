"""The reference's inputs checked against the contract before any math runs: a bad shape, dtype, target, vocab
partition or given count raises here with the field, what was expected and what was found."""

from __future__ import annotations

import math

import torch

from ce_guard import _dist
from ce_guard.contract import CEContract


def validate_reference_inputs(hidden, weight, targets, contract, grad_output, chunk_elements, token_chunk,
                              backward_dtype, given_count=None) -> None:
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
    _check_given_count(given_count, contract)
    tp_size = _dist.group_size(contract.tp_group)
    if tp_size == 1 and not contract.is_full_vocab:
        raise ValueError(f"the weight slice [{contract.vocab_start}, {contract.vocab_end}) is not the whole vocabulary"
                         f" ({contract.vocab_size}) but the TP group has one rank; pass the TP group in the contract.")
    if tp_size > 1:
        _check_partition_tiles(contract, weight.device)


def _check_given_count(given_count, contract: CEContract) -> None:
    """A count is handed in exactly when the contract's mean divides by one, and it is a finite number > 0."""
    if contract.normalize_by == "given_count" and given_count is None:
        raise ValueError(f"{contract} divides its mean by a count given with each step, but `given_count` is"
                         " None; pass the step's count (transformers' num_items_in_batch).")
    if contract.normalize_by != "given_count" and given_count is not None:
        raise ValueError(f"`given_count`={given_count!r} was passed, but {contract} does not divide by a given"
                         " count; drop it, or declare normalize_by='given_count'.")
    if given_count is None:
        return
    value = given_count.item() if isinstance(given_count, torch.Tensor) and given_count.numel() == 1 else given_count
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError("`given_count` must be a finite number > 0 (or a one-element tensor of one),"
                         f" got {given_count!r}.")


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
