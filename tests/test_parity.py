"""compare(): the gradient statistics are read a block of rows at a time, with the answers of a whole-tensor read."""

import dataclasses

import pytest
import torch
from memory_probe import AllocationProbe

from ce_guard import parity
from ce_guard.contract import CEContract
from ce_guard.parity import SeamOutputs, compare
from ce_guard.reference import reference_linear_cross_entropy


def _seam(v: int = 3000, n: int = 96, d: int = 48):
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.2
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::9] = -100
    contract = CEContract(vocab_size=v)
    reference = reference_linear_cross_entropy(hidden, weight, targets, contract)
    # A drifting fused result with structure in every statistic: a scale, a common row shift, noise.
    noise = lambda t: torch.randn(t.shape, generator=g) * 1e-3 * t.abs().mean()  # noqa: E731
    fused = SeamOutputs(loss=reference.loss * 1.01,
                        grad_hidden=reference.grad_hidden * 1.01 + noise(reference.grad_hidden),
                        grad_weight=reference.grad_weight * 1.01 + 1e-4 + noise(reference.grad_weight))
    return fused, reference, contract


def test_blockwise_statistics_equal_a_single_block(monkeypatch):
    fused, reference, contract = _seam()
    whole = compare(fused, reference, contract)
    monkeypatch.setattr(parity, "_STAT_BLOCK_ELEMENTS", 100)  # ~2 rows a block: hundreds of blocks
    blocked = compare(fused, reference, contract)
    for field in dataclasses.fields(whole):
        a, b = getattr(whole, field.name), getattr(blocked, field.name)
        if isinstance(a, float):
            assert b == pytest.approx(a, rel=1e-10, abs=1e-15), field.name
        else:
            assert a == b, field.name


def test_a_weight_gradient_is_never_copied_whole(monkeypatch):
    v, d = 20000, 64
    fused, reference, contract = _seam(v=v, n=32, d=d)
    monkeypatch.setattr(parity, "_STAT_BLOCK_ELEMENTS", 1 << 14)
    with AllocationProbe() as probe:
        probe.ignore(fused.loss, fused.grad_hidden, fused.grad_weight, reference.grad_hidden, reference.grad_weight)
        compare(fused, reference, contract)
    whole_fp64_copy = v * d * 8
    assert probe.stats.largest_bytes < whole_fp64_copy / 8, probe.stats
    assert probe.stats.peak_bytes < whole_fp64_copy / 2, probe.stats
