"""FusedLinearCrossEntropy across 2 gloo ranks: vocab parallel, sequence parallel, global-token means, faults.

Every case runs in ONE spawn (a module fixture) to keep CI fast; each rank compares its distributed
result against the same layer run on one rank over the whole vocabulary / whole sequence, which
test_fused.py has already pinned to float64 PyTorch.
"""

from __future__ import annotations

import importlib.util
import io
import math

import pytest
import torch
import torch.distributed as dist
from dist_helpers import run_distributed
from torch import nn

from ce_guard import fused_kernel
from ce_guard.contract import CEContract
from ce_guard.testing import fused_layer

pytestmark = pytest.mark.distributed

IGNORE = -100
N, D, V = 29, 13, 123
BOUNDARY = 62  # rank 0 holds [0, 62), rank 1 holds [62, 123): an uneven split on purpose
SLICES = [(0, BOUNDARY), (BOUNDARY, V)]


def _inputs(n, *, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, D, generator=g, dtype=dtype) * 2
    weight = torch.randn(V, D, generator=g, dtype=dtype) / math.sqrt(D)
    targets = torch.randint(0, V, (n,), generator=g)
    # Targets on both sides of and exactly at each slice edge, plus ignored tokens.
    targets[:6] = torch.tensor([BOUNDARY - 1, BOUNDARY, BOUNDARY + 1, 0, V - 1, BOUNDARY])
    targets[6::5] = IGNORE
    return hidden, weight, targets


def _run(hidden, weight, targets, contract, *, fault=None, upstream=None, token_chunk=7):
    head = fused_layer(hidden.shape[-1], contract, weight=nn.Parameter(weight.clone()), token_chunk=token_chunk,
                       fault=fault)
    h = hidden.clone().requires_grad_()
    loss = head(h, targets)
    upstream = torch.ones_like(loss) if upstream is None else upstream
    dh, dw = torch.autograd.grad(loss, (h, head.weight), upstream)
    return loss.detach(), dh, dw


def _vocab_parallel_cases(rank, group):
    """TP=2 against TP=1, per reduction, with smoothing, z-loss, softcap, ignore and boundary targets."""
    start, end = SLICES[rank]
    hidden, weight, targets = _inputs(N, seed=1)
    out = {}
    for reduction in ("mean", "sum", "none"):
        options = dict(vocab_size=V, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                       accum_dtype=torch.float64)
        upstream = torch.linspace(-1, 2, N, dtype=torch.float64) if reduction == "none" else None
        whole = _run(hidden, weight, targets, CEContract(**options), upstream=upstream)
        tp = _run(hidden, weight[start:end], targets, upstream=upstream,
                  contract=CEContract(**options, layout="[S,B,V/TP]", vocab_start=start, vocab_end=end,
                                      tp_group=group))
        out[f"tp_{reduction}"] = (tp, (whole[0], whole[1], whole[2][start:end]))
    # fp32 inputs and fp32 accumulators: same agreement at fp32 precision.
    hidden32, weight32 = hidden.float(), weight.float()
    whole = _run(hidden32, weight32, targets, CEContract(vocab_size=V, label_smoothing=0.1))
    tp = _run(hidden32, weight32[start:end], targets,
              CEContract(vocab_size=V, label_smoothing=0.1, layout="[S,B,V/TP]", vocab_start=start,
                         vocab_end=end, tp_group=group))
    out["tp_fp32"] = (tp, (whole[0], whole[1], whole[2][start:end]))
    return out


def _sequence_parallel_cases(rank, group):
    """[S/SP,B,V/TP]: each rank holds S/2 of the sequence; loss over the gathered sequence."""
    start, end = SLICES[rank]
    seq, batch = 6, 3
    hidden, weight, targets = _inputs(seq * batch, seed=2)
    hidden, targets = hidden.reshape(seq, batch, D), targets.reshape(seq, batch)  # (S, B, D), (S, B)
    rows = slice(rank * seq // 2, (rank + 1) * seq // 2)  # this rank's sequence shard
    out = {}
    for reduction in ("mean", "none"):
        options = dict(vocab_size=V, reduction=reduction, label_smoothing=0.1, accum_dtype=torch.float64)
        upstream = torch.arange(seq * batch, dtype=torch.float64).reshape(seq, batch) if reduction == "none" else None
        whole = _run(hidden, weight, targets, CEContract(**options), upstream=upstream)
        sp = _run(hidden[rows], weight[start:end], targets[rows], upstream=upstream,
                  contract=CEContract(**options, layout="[S/SP,B,V/TP]", vocab_start=start, vocab_end=end,
                                      tp_group=group))
        out[f"sp_{reduction}"] = (sp, (whole[0], whole[1][rows], whole[2][start:end]))
    return out


def _global_token_cases(rank, group):
    """Mean over global tokens on a DP group of 2 with unequal padding (rank 0 pads far more)."""
    hidden_all, weight, targets_all = _inputs(2 * N, seed=3)
    targets_all[: N // 2] = IGNORE  # rank 0's first half is padding; rank 1 keeps almost all tokens
    mine = slice(rank * N, (rank + 1) * N)
    hidden, targets = hidden_all[mine], targets_all[mine]
    whole = _run(hidden_all, weight, targets_all, CEContract(vocab_size=V, accum_dtype=torch.float64))
    base = dict(vocab_size=V, normalize_by="global_tokens", token_group=group, accum_dtype=torch.float64)
    out = {"global_whole": (whole[0], whole[1][mine], whole[2]),
           "local_count": (targets != IGNORE).sum().item(), "global_count": (targets_all != IGNORE).sum().item()}
    for grad_sync in ("average", "sum"):
        out[f"global_{grad_sync}"] = _run(hidden, weight, targets, CEContract(**base, grad_sync=grad_sync))
    out["global_local_fault"] = _run(hidden, weight, targets, CEContract(**base),
                                     fault="local_normalization")
    return out


def _tp_fault_cases(rank, group):
    """The partition faults at TP=2, each beside the honest TP=2 run on the same inputs."""
    start, end = SLICES[rank]
    hidden, weight, targets = _inputs(N, seed=4)
    out = {"targets": targets}
    for smoothing in (0.0, 0.2):
        contract = CEContract(vocab_size=V, reduction="none", label_smoothing=smoothing, layout="[S,B,V/TP]",
                              vocab_start=start, vocab_end=end, tp_group=group, accum_dtype=torch.float64)
        out[f"honest_{smoothing}"] = _run(hidden, weight[start:end], targets, contract)
        for fault in ("unmasked_partition_targets", "partition_off_by_one", "smoothing_local_vocab",
                      "gathered_logits_log_tp"):
            out[f"{fault}_{smoothing}"] = _run(hidden, weight[start:end], targets, contract, fault=fault)
    return out


def _kernel_cases(rank, group):
    """The Triton path's statistics / all-reduce / gradient split at TP=2 (SP too) against one rank's torch math.

    Runs under Triton's CPU interpreter (forced onto CPU tensors); empty where Triton is not installed.
    """
    if importlib.util.find_spec("triton") is None:
        return {}
    start, end = SLICES[rank]
    hidden, weight, targets = (t.float() if t.is_floating_point() else t for t in _inputs(N, seed=5))
    out = {}
    for reduction, token_chunk in (("mean", 8), ("sum", None)):
        options = dict(vocab_size=V, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
        whole = _run(hidden, weight, targets, CEContract(**options), token_chunk=token_chunk)
        forced = fused_kernel.kernel_applies
        fused_kernel.kernel_applies = lambda h, m: fused_kernel.kernel_covers(m, h.dtype)
        try:
            tp = _run(hidden, weight[start:end], targets, token_chunk=token_chunk,
                      contract=CEContract(**options, layout="[S,B,V/TP]", vocab_start=start, vocab_end=end,
                                          tp_group=group))
        finally:
            fused_kernel.kernel_applies = forced
        out[f"kernel_tp_{reduction}"] = (tp, (whole[0], whole[1], whole[2][start:end]))
    return out


def _all_cases(rank, world_size):
    group = dist.group.WORLD
    results = {**_vocab_parallel_cases(rank, group), **_sequence_parallel_cases(rank, group),
               **_global_token_cases(rank, group), **_tp_fault_cases(rank, group), **_kernel_cases(rank, group)}
    # As bytes: tensors sent through the queue go by shared memory, which dies with the child.
    buffer = io.BytesIO()
    torch.save(results, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def ranks():
    return [torch.load(io.BytesIO(blob)) for blob in run_distributed(_all_cases, 2)]


def _assert_triplet(actual, expected, rtol):
    for a, e, name in zip(actual, expected, ("loss", "dL/dh", "dW slice")):
        floor = rtol * e.abs().max().item()
        torch.testing.assert_close(a, e, rtol=rtol, atol=floor, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", ["tp_mean", "tp_sum", "tp_none", "sp_mean", "sp_none"])
def test_parallel_layouts_equal_one_rank(ranks, case):
    for result in ranks:
        _assert_triplet(*result[case], rtol=1e-12)


def test_vocab_parallel_fp32_equals_one_rank(ranks):
    for result in ranks:
        _assert_triplet(*result["tp_fp32"], rtol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kernel_path_at_tp2_equals_one_rank(ranks, reduction):
    if f"kernel_tp_{reduction}" not in ranks[0]:
        pytest.skip("Triton is not installed")
    for result in ranks:
        _assert_triplet(*result[f"kernel_tp_{reduction}"], rtol=1e-5)


def test_global_tokens_with_unequal_padding(ranks):
    local = [r["local_count"] for r in ranks]
    global_count = ranks[0]["global_count"]
    assert local[0] != local[1] and sum(local) == global_count
    whole_loss, _, whole_dw = ranks[0]["global_whole"]
    # grad_sync='average': each rank divides by global/2, so DDP's averaging yields the exact global mean.
    losses = [r["global_average"][0] for r in ranks]
    torch.testing.assert_close(sum(losses) / 2, whole_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(sum(r["global_average"][2] for r in ranks) / 2, whole_dw, rtol=1e-12, atol=1e-15)
    for r in ranks:
        torch.testing.assert_close(r["global_average"][1], 2 * r["global_whole"][1], rtol=1e-12, atol=1e-15)
    # grad_sync='sum': divide by the global count itself; summed grads are the global-mean grads.
    torch.testing.assert_close(sum(r["global_sum"][0] for r in ranks), whole_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(sum(r["global_sum"][2] for r in ranks), whole_dw, rtol=1e-12, atol=1e-15)
    for r in ranks:
        torch.testing.assert_close(r["global_sum"][1], r["global_whole"][1], rtol=1e-12, atol=1e-15)


def test_local_normalization_fault_is_off_by_the_count_ratio(ranks):
    for r in ranks:
        ratio = (r["global_count"] / 2) / r["local_count"]  # docs/faults.md row 1: n_global / (size * n_local)
        honest, faulty = r["global_average"], r["global_local_fault"]
        assert (faulty[0] / honest[0]).item() == pytest.approx(ratio, rel=1e-12)
        torch.testing.assert_close(faulty[1], honest[1] * ratio, rtol=1e-12, atol=1e-15)
    averaged = sum(r["global_local_fault"][0] for r in ranks) / 2
    assert not torch.allclose(averaged, ranks[0]["global_whole"][0], rtol=1e-3)  # unequal padding: biased


def test_gathered_logits_adds_exactly_log_tp(ranks):
    for r in ranks:
        valid = r["targets"] != IGNORE
        honest, faulty = r["honest_0.0"][0], r["gathered_logits_log_tp_0.0"][0]
        torch.testing.assert_close(faulty[valid] - honest[valid], torch.full_like(honest[valid], math.log(2)),
                                   rtol=0, atol=1e-12)
        assert not faulty[~valid].any()


def test_off_by_one_hits_only_boundary_targets(ranks):
    at_boundary = ranks[0]["targets"] == BOUNDARY
    assert at_boundary.sum() == 2
    for r in ranks:
        changed = (r["partition_off_by_one_0.0"][0] - r["honest_0.0"][0]).abs() > 1e-9
        torch.testing.assert_close(changed, at_boundary)  # rank 0's slice wrongly claims target 62


def test_unmasked_targets_change_every_visible_token(ranks):
    valid = ranks[0]["targets"] != IGNORE
    for r in ranks:
        changed = (r["unmasked_partition_targets_0.0"][0] - r["honest_0.0"][0]).abs() > 1e-9
        torch.testing.assert_close(changed, valid)
        assert rel_err(r["unmasked_partition_targets_0.0"][1], r["honest_0.0"][1]) > 1e-2


def test_local_smoothing_differs_across_tp_ranks(ranks):
    honest = [r["honest_0.2"][0] for r in ranks]
    faulty = [r["smoothing_local_vocab_0.2"][0] for r in ranks]
    torch.testing.assert_close(honest[0], honest[1], rtol=0, atol=0)  # the honest loss is replicated over TP
    assert (faulty[0] - faulty[1]).abs().max() > 1e-3  # Megatron's open bug: each rank sees a different loss
    for r in ranks:  # without smoothing the fault has nothing to break
        torch.testing.assert_close(r["smoothing_local_vocab_0.0"][0], r["honest_0.0"][0], rtol=0, atol=0)


def rel_err(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()
