"""The reference and the diagnosis across 2 gloo ranks: TP (vocab slices), SP, and a DP token group."""

import math

import pytest
import torch
import torch.distributed as dist

from broken_paths import broken_fused
from ce_guard.budget import native_error_budget
from ce_guard.contract import CEContract
from ce_guard.diagnosis import diagnose
from ce_guard.parity import SeamOutputs, compare
from ce_guard.reference import reference_linear_cross_entropy
from dist_helpers import run_distributed

pytestmark = pytest.mark.distributed
V, D, S, B = 96, 16, 24, 2
OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3, softcap=6.0)


def _inputs():
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(S, B, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.5
    targets = torch.randint(0, V, (S, B), generator=gen)
    targets[0, 0], targets[1, 0], targets[2, 1] = V // 2 - 1, V // 2, 0  # both sides of the TP boundary
    targets[3::5, 1] = -100
    return hidden, weight, targets


def _tp_contract(rank, world, **kw):
    slice_ = V // world
    return CEContract(vocab_size=V, layout=kw.pop("layout", "[S,B,V/TP]"), vocab_start=rank * slice_,
                      vocab_end=(rank + 1) * slice_, tp_group=dist.group.WORLD, **kw)


def _diagnose(hidden, weight, targets, contract, fault, **sizes):
    fused = broken_fused(hidden, weight, targets, contract, fault)
    reference = reference_linear_cross_entropy(hidden, weight, targets, contract)
    report = compare(fused, reference, contract, budget=native_error_budget(hidden, weight, targets, contract))
    d = diagnose(report, group_sizes=sizes or None)
    return d.cause.value, d.summary


def tp_cases(rank, world):
    hidden, weight, targets = _inputs()
    rows = slice(rank * V // world, (rank + 1) * V // world)
    out = {}
    for reduction in ("mean", "none"):
        whole = CEContract(vocab_size=V, reduction=reduction, **OPTIONS)
        part = _tp_contract(rank, world, reduction=reduction, **OPTIONS)
        g = torch.linspace(0.5, 1.5, S * B).reshape(S, B) if reduction == "none" else 1.0
        one = reference_linear_cross_entropy(hidden, weight, targets, whole, grad_output=g)
        two = reference_linear_cross_entropy(hidden, weight[rows], targets, part, grad_output=g)
        out[reduction] = [float((one.loss - two.loss).abs().max()),
                          float((one.grad_hidden - two.grad_hidden).abs().max()),
                          float((one.grad_weight[rows] - two.grad_weight).abs().max())]

    # SP: each rank brings S/2 rows of the sequence; the loss is over the gathered sequence.
    seq = slice(rank * S // world, (rank + 1) * S // world)
    whole = CEContract(vocab_size=V, **OPTIONS)
    sp = _tp_contract(rank, world, layout="[S/SP,B,V/TP]", **OPTIONS)
    one = reference_linear_cross_entropy(hidden, weight, targets, whole)
    two = reference_linear_cross_entropy(hidden[seq], weight[rows], targets[seq], sp)
    out["sp"] = [float((one.loss - two.loss).abs()), float((one.grad_hidden[seq] - two.grad_hidden).abs().max()),
                 float((one.grad_weight[rows] - two.grad_weight).abs().max())]

    contract = _tp_contract(rank, world, label_smoothing=0.1)
    for fault in (None, "unmasked_partition_targets", "partition_off_by_one", "smoothing_local_vocab",
                  "gathered_logits_log_tp"):
        out[f"diag_{fault}"] = _diagnose(hidden, weight[rows], targets, contract, fault, TP=world)
    # Every slice's rows share one mean: local and global mean logits agree, local-V smoothing moves no loss.
    slice_means = weight.reshape(world, V // world, D).mean(dim=1).repeat_interleave(V // world, dim=0)
    even = weight - slice_means + weight.mean(dim=0)
    out["diag_smoothing_no_offset"] = _diagnose(hidden, even[rows], targets, contract, "smoothing_local_vocab",
                                                TP=world)
    unpadded = targets.masked_fill(targets == -100, 1)  # equal counts per shard: the scale is exactly SP
    out["diag_sp_shard"] = _diagnose(hidden[seq], weight[rows], unpadded[seq],
                                     _tp_contract(rank, world, layout="[S/SP,B,V/TP]"), "shard_normalization",
                                     TP=world, SP=world)
    out["loss_parallel"] = _against_loss_parallel(hidden, weight, targets, rank, world)
    out["diag_sp_shard_unequal"] = _diagnose(hidden[seq], weight[rows], targets[seq],
                                             _tp_contract(rank, world, layout="[S/SP,B,V/TP]"),
                                             "shard_normalization", TP=world, SP=world)
    for dtype in (torch.float32, torch.bfloat16):
        h, w = hidden.to(dtype), weight[rows].to(dtype)
        for fault in ("partial_grad_hidden", "doubled_grad_hidden"):
            fused = broken_fused(h, w, targets, contract, fault)
            reference = reference_linear_cross_entropy(h, w, targets, contract)
            report = compare(fused, reference, contract, budget=native_error_budget(h, w, targets, contract))
            d = diagnose(report)
            out[f"diag_{fault}_{dtype}"] = (d.cause.value, d.summary, report.grad_hidden_norm_ratio,
                                            report.grad_hidden_tp_sum_rel_err)
    return out


def _against_loss_parallel(hidden, weight, targets, rank, world):
    """PyTorch's own vocab-parallel CE (DTensor logits, loss_parallel) is an independent check of the reference."""
    from torch.distributed.device_mesh import init_device_mesh

    from ce_guard.adapters import LossParallelCrossEntropy

    mesh = init_device_mesh("cpu", (world,))
    rows = slice(rank * V // world, (rank + 1) * V // world)
    out = {}
    for reduction in ("mean", "sum"):
        layer = LossParallelCrossEntropy(D, V, mesh, reduction=reduction, weight=torch.nn.Parameter(weight[rows].clone()))
        h = hidden.clone().requires_grad_()
        loss = layer(h, targets)
        loss.backward()
        fused = SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=layer.weight.grad)
        reference = reference_linear_cross_entropy(hidden, weight[rows], targets, layer.ce_contract)
        report = compare(fused, reference, layer.ce_contract)
        out[reduction] = (diagnose(report).cause.value, report.loss_rel_err, report.grad_hidden_rel_err,
                          report.grad_weight_rel_err)
    return out


def dp_cases(rank, world):
    gen = torch.Generator().manual_seed(11)
    hidden_all = torch.randn(world, 40, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 0.5
    targets_all = torch.randint(0, V, (world, 40), generator=gen)
    targets_all[0, :4] = -100   # rank 0: 10% padding
    targets_all[1, :20] = -100  # rank 1: 50% padding: local and global means now differ
    hidden, targets = hidden_all[rank], targets_all[rank]
    out = {}
    contract = CEContract(vocab_size=V, normalize_by="global_tokens", token_group=dist.group.WORLD)
    result = reference_linear_cross_entropy(hidden, weight, targets, contract)
    # What DDP/FSDP does next: average over ranks. It must equal the mean over every visible token.
    averaged = result.loss.clone()
    dist.all_reduce(averaged)
    h64 = hidden_all.reshape(-1, D).double()
    exact = torch.nn.functional.cross_entropy(h64 @ weight.double().T, targets_all.reshape(-1))
    out["global_mean"] = [float(averaged / world), float(exact), result.n_visible, result.n_visible_global]

    out["unequal_local"] = _diagnose(hidden, weight, targets, contract, "local_normalization", DP=world)
    equal = targets_all[rank].clone()
    equal[:20] = -100  # both ranks now pad 20 of 40
    out["equal_local"] = _diagnose(hidden, weight, equal, contract, "local_normalization", DP=world)
    summed = CEContract(vocab_size=V, normalize_by="global_tokens", token_group=dist.group.WORLD, grad_sync="sum")
    out["sum_sync_local"] = _diagnose(hidden, weight, equal, summed, "local_normalization", DP=world)
    return out


@pytest.fixture(scope="module")
def tp_results():
    return run_distributed(tp_cases, 2)


@pytest.fixture(scope="module")
def dp_results():
    return run_distributed(dp_cases, 2)


@pytest.mark.parametrize("case", ["mean", "none", "sp"])
def test_vocab_parallel_reference_equals_tp1(tp_results, case):
    for rank, res in enumerate(tp_results):
        loss_diff, dh_diff, dw_diff = res[case]
        assert loss_diff < 2e-5 and dh_diff < 2e-5 and dw_diff < 2e-5, (rank, res[case])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reference_agrees_with_torch_loss_parallel(tp_results, reduction):
    for res in tp_results:
        cause, loss_err, dh_err, dw_err = res["loss_parallel"][reduction]
        assert cause == "within_budget" and loss_err < 1e-6 and dh_err < 1e-5 and dw_err < 1e-5, res["loss_parallel"]


def test_clean_tp_path_is_within_budget(tp_results):
    assert all(r["diag_None"][0] == "within_budget" for r in tp_results), [r["diag_None"] for r in tp_results]


@pytest.mark.parametrize("fault", ["unmasked_partition_targets", "partition_off_by_one"])
def test_partition_masking_faults_are_target_masking(tp_results, fault):
    causes = [r[f"diag_{fault}"] for r in tp_results]
    assert all(c == "target_masking" for c, _ in causes), causes
    assert "vocab slice's edges" in causes[0][1]


def test_local_vocab_smoothing_is_named(tp_results):
    causes = [r["diag_smoothing_local_vocab"] for r in tp_results]
    assert all(c == "label_smoothing_local_v" for c, _ in causes), causes
    assert "differs across TP ranks" in causes[0][1]


def test_local_vocab_smoothing_without_a_loss_offset_is_named_from_the_gradients(tp_results):
    causes = [r["diag_smoothing_no_offset"] for r in tp_results]
    assert all(c == "label_smoothing_local_v" for c, _ in causes), causes
    assert "one constant shift of dL/dz over this vocab slice" in causes[0][1]


def test_gathered_logits_offset_is_log_tp(tp_results):
    cause, summary = tp_results[0]["diag_gathered_logits_log_tp"]
    assert cause == "log_tp_offset" and "= log(2)" in summary and f"{math.log(2):.5f}" in summary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unreduced_hidden_gradient_is_named_from_the_ranks_sum(tp_results, dtype):
    for res in tp_results:
        cause, summary, ratio, summed = res[f"diag_partial_grad_hidden_{dtype}"]
        assert cause == "tp_grad_reduction" and "partial dL/dh" in summary, summary
        assert ratio < 0.9 and summed is not None and summed < 0.02, (ratio, summed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_gradient_reduced_twice_is_exactly_tp_times(tp_results, dtype):
    for res in tp_results:
        cause, summary, ratio, summed = res[f"diag_doubled_grad_hidden_{dtype}"]
        assert cause == "tp_grad_reduction" and "all-reduced over TP twice" in summary, summary
        assert abs(ratio - 2) < 0.02 and summed is not None and summed > 1, (ratio, summed)


def test_clean_tp_check_moves_no_gradient_between_ranks(tp_results):
    assert all(r["diag_None"][0] == "within_budget" for r in tp_results)
    assert all(r["diag_partial_grad_hidden_torch.float32"][3] is not None for r in tp_results)


def test_sp_shard_divide_is_named_with_k_equals_sp(tp_results):
    cause, summary = tp_results[0]["diag_sp_shard"]
    assert cause == "normalization_owner", summary
    assert "k = 2 = TP = SP size" in summary and "sequence shard" in summary


def test_sp_shard_divide_with_unequal_padding_names_the_counts(tp_results):
    for res in tp_results:
        cause, summary = res["diag_sp_shard_unequal"]
        assert cause == "normalization_owner" and "this rank's own sequence shard's non-ignored tokens" in summary


def test_global_mean_survives_gradient_averaging_with_unequal_padding(dp_results):
    averaged, exact, n_visible, n_global = dp_results[0]["global_mean"]
    assert math.isclose(averaged, exact, rel_tol=1e-6) and (n_visible, n_global) == (36, 56)


def test_local_vs_global_with_unequal_padding_is_the_normalisation_owner(dp_results):
    for rank, res in enumerate(dp_results):
        cause, summary = res["unequal_local"]
        assert cause == "normalization_owner", (rank, summary)
        assert "divides by this rank's non-ignored tokens" in summary
        assert "global non-ignored tokens over the group size (28)" in summary


def test_local_and_global_agree_when_padding_is_equal(dp_results):
    assert all(r["equal_local"][0] == "within_budget" for r in dp_results)


def test_summed_gradients_make_local_division_a_k_equals_dp_scale(dp_results):
    cause, summary = dp_results[0]["sum_sync_local"]
    assert cause == "normalization_owner" and "k = 2 = DP size" in summary, summary
