"""A check's verdict and metrics are agreed in a fixed number of collectives of a fixed size, whatever the world."""

import math

import pytest
import torch

from dist_helpers import run_distributed

pytestmark = pytest.mark.distributed

TP, DP = 2, 4


def _checked_mesh(rank, world):
    """TP = 2 x DP = 4 on 8 gloo ranks: each TP pair checks its own vocab-parallel seam (replica 2's divides by a
    doubled count), then the world agrees. Counts every collective ``agree`` makes and the bytes it moves."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from ce_guard import agreement
    from ce_guard.check import SeamRecord, check_seam
    from ce_guard.contract import CEContract
    from ce_guard.metrics import check_metrics
    from ce_guard.parity import SeamOutputs
    from ce_guard.testing import fused_layer

    mesh = init_device_mesh("cpu", (DP, TP), mesh_dim_names=("dp", "tp"))
    dp_rank, tp_rank = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
    vocab, d, n = 64, 8, 48
    rows = vocab // TP
    contract = CEContract(vocab_size=vocab, layout="[S,B,V/TP]", vocab_start=tp_rank * rows,
                          vocab_end=(tp_rank + 1) * rows, tp_group=mesh["tp"].get_group())
    gen = torch.Generator().manual_seed(dp_rank)  # one batch per replica, the same on both TP ranks
    hidden = torch.randn(n, d, generator=gen).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    weight = torch.randn(vocab, d, generator=torch.Generator().manual_seed(0))[tp_rank * rows:(tp_rank + 1) * rows]
    layer = fused_layer(d, contract, weight=torch.nn.Parameter(weight.clone()),
                        fault="grad_scale" if dp_rank == 2 else None)
    loss = layer(hidden, targets)
    loss.backward()
    record = SeamRecord(hidden=hidden.detach(), weight=layer.weight.detach(), targets=targets,
                        fused=SeamOutputs(loss=loss.detach(), grad_hidden=hidden.grad, grad_weight=layer.weight.grad),
                        upstream=1.0)
    result = check_seam(record, contract)
    mine = {"rank": rank, "cause": result.diagnosis.cause.value, "variant": result.diagnosis.variant,
            "drift": result.diagnosis.drift, "summary": result.diagnosis.summary}
    means, maxima = check_metrics(result.report)

    calls = []
    all_reduce, broadcast = dist.all_reduce, dist.broadcast_object_list

    def counted_all_reduce(tensor, *args, **kwargs):
        calls.append(("all_reduce", tensor.numel() * tensor.element_size()))
        return all_reduce(tensor, *args, **kwargs)

    def counted_broadcast(objects, *args, **kwargs):
        calls.append(("broadcast", None))
        return broadcast(objects, *args, **kwargs)

    agreement.dist.all_reduce, agreement.dist.broadcast_object_list = counted_all_reduce, counted_broadcast
    try:
        agreed = agreement.agree(mine, means, maxima, device=torch.device("cpu"))
    finally:
        agreement.dist.all_reduce, agreement.dist.broadcast_object_list = all_reduce, broadcast
    return {"agreed": agreed, "calls": calls, "loss_rel_err": means["loss_rel_err"],
            "margin_grad_hidden": maxima["margin_grad_hidden"]}


def test_eight_ranks_agree_on_the_first_drifting_rank_in_two_all_reduces_and_one_broadcast():
    results = run_distributed(_checked_mesh, TP * DP, timeout=300)
    first = results[0]["agreed"]
    for res in results:
        agreed = res["agreed"]
        assert agreed.verdict == first.verdict and agreed.metrics == first.metrics
        assert (agreed.ranks, agreed.drifting_ranks) == (8, 2)  # replica 2's two TP ranks
        # Two vectors of fixed length and one broadcast of one verdict: nothing grows with the world.
        assert [kind for kind, _ in res["calls"]] == ["all_reduce", "all_reduce", "broadcast"]
        assert [size for kind, size in res["calls"] if kind == "all_reduce"] == [8 * 12, 8 * 7]
    assert first.verdict["rank"] == 4 and first.verdict["drift"] and first.verdict["cause"] == "normalization_scale"
    assert first.verdict["variant"].startswith("normalization_scale/")  # the variant travels with the verdict
    mean = sum(res["loss_rel_err"] for res in results) / len(results)
    assert first.metrics["loss_rel_err"] == pytest.approx(mean, rel=1e-12)
    assert first.metrics["margin_grad_hidden"] == max(res["margin_grad_hidden"] for res in results)
    assert all(not math.isnan(value) for value in first.metrics.values())


def test_on_one_process_the_verdict_is_its_own_and_nothing_is_sent():
    from ce_guard.agreement import agree

    agreed = agree({"rank": 0, "cause": "within_budget", "drift": False, "summary": "ok"},
                   {"loss": 0.5, "dw": None}, {"margin": float("nan"), "absent": None}, device=torch.device("cpu"))
    assert (agreed.ranks, agreed.drifting_ranks, agreed.verdict["cause"]) == (1, 0, "within_budget")
    assert agreed.metrics == {"loss": 0.5, "margin": math.inf}  # NaN reads as the worst margin; None stays absent
