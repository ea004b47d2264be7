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
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # fla's kernels on the GPU where there is one


def _inputs(seed: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * (2 / D ** 0.5)
    targets = torch.randint(0, V, (B, T), generator=gen)
    targets.view(-1)[::5] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def fla_check(layer, *, dtype=torch.float32, upstream=1.0, seed=0):
    """One forward and backward of ``layer`` (its weight overwritten), held to its contract by ``check_seam``."""
    hidden, weight, targets = (t.to(DEVICE) for t in _inputs(seed, dtype))
    layer = layer.to(DEVICE)
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
    return FlaFusedLinearCrossEntropy(D, V, l2_warp=l2_warp,
                                      loss_class=fla_or_skip(version).FusedLinearCrossEntropyLoss,
                                      dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_linear_cross_entropy_without_l2_warp_is_clean_on_0_6(dtype):
    named, summary = fla_check(fused(FIXED, dtype=dtype), dtype=dtype, upstream=0.25)
    assert named == "within_budget/clean", summary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_l2_warp_is_clean_on_0_6(dtype):
    named, summary = fla_check(fused(FIXED, dtype=dtype, l2_warp=FACTOR), dtype=dtype, upstream=0.25)
    assert named == "within_budget/clean", summary


def unfused(version: str, *, dtype=torch.float32):
    return FlaL2WarpCrossEntropy(D, V, l2_warp=FACTOR, l2_warp_fn=fla_or_skip(version).l2_warp, dtype=dtype)


# 0.5.0's fused kernels return NaN for bf16 inputs in Triton 3.9's CPU interpreter (loss and every gradient, with
# or without L2-warp; 0.6.0's kernels do not; on an H100 it is named as in fp32): the bf16 case needs a GPU.
BF16_ON_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="fla 0.5.0's fused bf16 kernels give NaN in Triton's CPU interpreter"))


@pytest.mark.parametrize("dtype", [torch.float32, BF16_ON_GPU], ids=str)
def test_fused_l2_warp_over_the_counted_tokens_is_named_on_0_5(dtype):
    """To 0.5.0 the fused path divided the penalty by the non-ignored tokens; fla's l2_warp divides by B*T."""
    named, summary = fla_check(fused("0.5.0", dtype=dtype, l2_warp=FACTOR), dtype=dtype)
    assert named == "penalty_normalization/l2_warp_over_counted", summary
    assert fla_check(fused(FIXED, dtype=dtype, l2_warp=FACTOR), dtype=dtype)[0] == "within_budget/clean"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_l2_warp_that_drops_the_upstream_gradient_is_named_on_0_5(dtype):
    """0.3.0-0.5.1's ``l2_warp`` backward returned the penalty's gradient unscaled by grad_output; visible only
    with an upstream other than 1 (here 0.25, as gradient accumulation over 4 micro-batches hands it)."""
    named, summary = fla_check(unfused("0.5.0", dtype=dtype), dtype=dtype, upstream=0.25)
    assert named == "backward_scale/l2_warp_upstream_ignored", summary
    assert fla_check(unfused(FIXED, dtype=dtype), dtype=dtype, upstream=0.25)[0] == "within_budget/clean"
