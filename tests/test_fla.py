"""flash-linear-attention's fused linear cross-entropy and ``l2_warp`` under the guard, each L2-warp bug named on
a pinned version.

Nothing here injects a fault: every wrong number comes from the code of the ``fla-core`` wheel named in the test
(loaded by ``fla_wheels``; on a CPU its Triton kernels run in Triton's interpreter). The penalty factor is 0.5, far
above fla's 1e-4, so that at 48 tokens its gradient stands out of the budget; the bugs do not depend on it.
"""

from __future__ import annotations

import pytest
import torch
from fla_wheels import fla_or_skip

from ce_guard import SeamOutputs, SeamRecord, check_seam
from ce_guard.fla_adapter import FlaFusedLinearCrossEntropy, FlaL2WarpCrossEntropy

FIXED = "0.6.0"
B, T, D, V = 3, 16, 16, 97  # 48 rows, every 5th ignored
FACTOR = 0.5


def _inputs(seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * (2 / D ** 0.5)
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets.view(-1)[::5] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def fla_check(layer, *, dtype=torch.float32, upstream=1.0, seed=0):
    """One forward and backward of ``layer`` (its weight overwritten), held to its contract by ``check_seam``."""
    hidden, weight, targets = _inputs(seed, dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    h = hidden.clone().requires_grad_()
    loss = layer(h, targets)
    (loss * upstream).backward()
    fused = SeamOutputs(loss=loss.detach().float(), grad_hidden=h.grad, grad_weight=layer.weight.grad)
    record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=upstream)
    diagnosis = check_seam(record, layer.ce_contract).diagnosis
    return diagnosis.variant, diagnosis.summary


def fused(version: str, *, dtype=torch.float32, l2_warp=0.0):
    return FlaFusedLinearCrossEntropy(D, V, l2_warp=l2_warp, loss_class=fla_or_skip(version).FusedLinearCrossEntropyLoss,
                                      dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_cross_entropy_without_l2_warp_is_clean_on_0_6(dtype):
    named, summary = fla_check(fused(FIXED, dtype=dtype), dtype=dtype, upstream=0.25)
    assert named == "within_budget/clean", summary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_l2_warp_is_clean_on_0_6(dtype):
    named, summary = fla_check(fused(FIXED, dtype=dtype, l2_warp=FACTOR), dtype=dtype, upstream=0.25)
    assert named == "within_budget/clean", summary
