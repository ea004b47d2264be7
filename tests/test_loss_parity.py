"""LossParity: token-weighted mean losses and their relative gap, exact on small inputs and synced over 2 gloo ranks."""

import pytest
import torch

from ce_guard.loss_parity import LossParity
from dist_helpers import run_distributed


def test_relative_gap_of_token_weighted_means():
    metric = LossParity()
    metric.update(torch.tensor(2.0), torch.tensor(1.0), 1)   # fused sum 2, reference sum 1
    metric.update(torch.tensor(1.0), torch.tensor(1.5), 3)   # fused sum 3, reference sum 4.5
    # fused mean 5 / 4 = 1.25, reference mean 5.5 / 4 = 1.375: |1.25 - 1.375| / 1.375 = 1 / 11
    assert metric.compute().item() == pytest.approx(1 / 11, rel=1e-15)
    assert (metric.fused_sum.item(), metric.reference_sum.item(), metric.tokens.item()) == (5.0, 5.5, 4.0)
    metric.reset()
    metric.update(torch.tensor(3.0, dtype=torch.bfloat16), torch.tensor(3.0), torch.tensor(7))
    assert metric.compute().item() == 0.0


def test_a_per_token_loss_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="`fused_loss` must be a scalar mean loss, got shape \\(4,\\)"):
        LossParity().update(torch.ones(4), torch.tensor(1.0), 4)


def _two_ranks(rank, world):
    metric = LossParity()
    # Rank 0: 2 tokens at fused 1.0 / reference 1.0; rank 1: 6 tokens at fused 2.0 / reference 1.5.
    fused, reference, tokens = [(1.0, 1.0, 2), (2.0, 1.5, 6)][rank]
    metric.update(torch.tensor(fused), torch.tensor(reference), tokens)
    local = LossParity(sync_on_compute=False)
    local.update(torch.tensor(fused), torch.tensor(reference), tokens)
    return metric.compute().item(), local.compute().item()


@pytest.mark.distributed
def test_two_gloo_ranks_sync_their_sums():
    (synced0, local0), (synced1, local1) = run_distributed(_two_ranks, 2)
    # fused mean (2 + 12) / 8 = 1.75, reference mean (2 + 9) / 8 = 1.375: gap 0.375 / 1.375 = 3 / 11
    assert synced0 == synced1 == pytest.approx(3 / 11, rel=1e-15)
    assert (local0, local1) == (0.0, pytest.approx(1 / 3, rel=1e-15))  # unsynced: each rank's own
