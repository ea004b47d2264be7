"""Per-token upstream weights (``reduction='none'``): the fitted weights against float64, and a path that applies the
first token's weight to all, one that applies them in another order, and a correct one, under random per-token
weights (uniform in [0, 2] times the padding mask), in fp32 and bf16, at TP = 1 and TP = 2 (gloo).

docs/faults.md rows 16 (``upstream_broadcast``) and 17 (``upstream_order``).
"""

from __future__ import annotations

import doctest
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from broken_paths import broken_fused
from dist_helpers import run_distributed

from ce_guard import CEContract, SeamRecord, check_seam, upstream_fit
from ce_guard.upstream_fit import MISPLACED_SHARE, fit_upstream

S, B, D, V = 12, 8, 16, 96  # [S,B] tokens: 96, every 7th target ignored from the second on
IGNORE = -100
FAULTS = {None: "within_budget/clean", "upstream_first_token": "upstream_broadcast/first_token",
          "upstream_permuted": "upstream_order/permuted", "upstream_transposed": "upstream_order/transposed"}
# The applied weights' rms residual against the reading that is the fault, in units of the upstream's spread: the
# fit reads the fused dL/dh's rounding (fp32 1e-7, bf16 3e-3 on the injection table's shapes).
FIT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
# ... and the reading's scale off 1: the common factor by which a path rounds its dL/dh.
SCALE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _inputs(dtype: torch.dtype, *, seed: int = 0, first_masked: bool = False):
    """[S,B,D] hidden, [V,D] weight, [S,B] targets and per-token upstream weights uniform in [0, 2] times the padding
    mask. The first token is visible (its weight is the one a broadcast applies) unless ``first_masked``."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, B, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * (2 / D ** 0.5)
    targets = torch.randint(0, V, (S, B), generator=gen)
    flat = targets.view(-1)
    flat[(0 if first_masked else 1)::7] = IGNORE
    upstream = torch.rand(S, B, generator=gen) * 2 * (targets != IGNORE)
    return hidden.to(dtype), weight.to(dtype), targets, upstream


def _check(fault, dtype, *, seed: int = 0, first_masked: bool = False, contract=None, weight_rows=slice(None),
           upstream=None):
    hidden, weight, targets, u = _inputs(dtype, seed=seed, first_masked=first_masked)
    u = u if upstream is None else upstream
    contract = contract or CEContract(vocab_size=V, reduction="none")
    weight = weight[weight_rows]
    fused = broken_fused(hidden, weight, targets, contract, fault, grad_output=u)
    return check_seam(SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=u), contract), u


# --- the fit against float64 -------------------------------------------------------------------------------------


def _float64_grads(applied: torch.Tensor, seed: int = 0):
    """dL/dh in float64 of the per-token losses under ``applied`` weights, and under the tokens' own."""
    hidden, weight, targets, u = _inputs(torch.float64, seed=seed)

    def grad(w: torch.Tensor) -> torch.Tensor:
        h = hidden.clone().requires_grad_()
        per_token = F.cross_entropy((h @ weight.T).reshape(-1, V), targets.reshape(-1), reduction="none")
        per_token.backward(w.reshape(-1).double())
        return h.grad

    return grad(applied), grad(u), u, targets


def _token_weight(u: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.where(targets != IGNORE, u, 0.0).reshape(-1)


def test_the_fit_reads_the_first_tokens_weight_on_every_token_in_float64():
    _, _, _, u = _inputs(torch.float64)
    fused, ref, u, targets = _float64_grads(torch.full_like(u, float(u[0, 0])))
    fit = fit_upstream(fused, ref, _token_weight(u, targets), u, targets.shape)
    assert fit.tokens == int((u != 0).sum()) and fit.first_weight == float(u[0, 0]) != 0
    assert abs(fit.applied_mean - fit.first_weight) < 1e-12 and fit.applied_spread < 1e-12
    assert fit.first_residual < 1e-12 and abs(fit.first_scale - 1) < 1e-12 and fit.noise < 1e-12
    visible, c = u[u != 0].double(), float(u[0, 0])
    k = c * float(visible.sum() / visible.square().sum())  # the best scale of the own weights for a constant c
    spread = float(u.double().std(unbiased=False))
    assert abs(fit.own_scale - k) < 1e-12 and abs(fit.own_residual - float((c - visible).square().mean().sqrt()) / spread) < 1e-12
    assert abs(fit.scaled_residual - float((c - k * visible).square().mean().sqrt()) / spread) < 1e-12
    assert abs(fit.weight_mean - float(visible.mean())) < 1e-12
    assert abs(fit.weight_spread - float(visible.std(unbiased=False))) < 1e-12


def test_the_fit_reads_a_transpose_and_counts_the_misplaced_tokens_in_float64():
    _, _, _, u = _inputs(torch.float64)
    applied = u.mT.reshape(S, B)  # the [B,S] buffer's order read as [S,B]
    fused, ref, u, targets = _float64_grads(applied)
    fit = fit_upstream(fused, ref, _token_weight(u, targets), u, targets.shape)
    assert fit.transposed_residual < 1e-12 and abs(fit.transposed_scale - 1) < 1e-12
    assert fit.transposed_read == f"its [{B},{S}] buffer read as [{S},{B}]"
    fitted = u.reshape(-1) != 0
    off = (applied.reshape(-1) - u.reshape(-1)).abs()[fitted]
    assert fit.misplaced == float((off > MISPLACED_SHARE * float(u.std(unbiased=False))).double().mean()) > 0.8
    assert fit.own_residual > 1.0 and fit.sorted_residual < 0.1


def test_the_fit_reads_a_permutation_by_its_sorted_values_in_float64():
    _, _, _, u = _inputs(torch.float64)
    applied = u.reshape(-1)[torch.randperm(S * B, generator=torch.Generator().manual_seed(3))].reshape(S, B)
    fused, ref, u, targets = _float64_grads(applied)
    fit = fit_upstream(fused, ref, _token_weight(u, targets), u, targets.shape)
    assert fit.sorted_residual < 0.1 and abs(fit.sorted_scale - 1) < 0.1
    assert min(fit.own_residual, fit.scaled_residual, fit.transposed_residual, fit.first_residual) > 0.5


def test_a_constant_or_scalar_upstream_is_not_fitted():
    fused, ref, u, targets = _float64_grads(torch.ones(S, B))
    assert fit_upstream(fused, ref, _token_weight(u, targets), torch.ones(S, B), targets.shape) is None
    assert fit_upstream(fused, ref, _token_weight(u, targets), 1.0, targets.shape) is None


def test_the_modules_example_runs():
    assert doctest.testmod(upstream_fit).failed == 0


# --- one rank: named, and clean when correct ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fault", list(FAULTS), ids=str)
def test_one_rank_paths_are_named_or_clean(fault, dtype):
    result, u = _check(fault, dtype)
    d, fit = result.diagnosis, result.report.upstream_fit
    assert d.variant == FAULTS[fault], d.summary
    if fault is None:
        assert fit is None and result.report.within_budget  # a clean check pays for no fit
        return
    assert d.fault_row == (16 if fault == "upstream_first_token" else 17)
    reading, scale = {"upstream_first_token": (fit.first_residual, fit.first_scale),
                      "upstream_permuted": (fit.sorted_residual, fit.sorted_scale),
                      "upstream_transposed": (fit.transposed_residual, fit.transposed_scale)}[fault]
    tolerance = 0.1 if fault == "upstream_permuted" else FIT_TOLERANCE[dtype]  # sorted values: sampling, not rounding
    assert reading < tolerance and fit.own_residual > 1.0, d.evidence
    assert abs(scale - 1) < (0.1 if fault == "upstream_permuted" else SCALE_TOLERANCE[dtype]), d.evidence
    if fault == "upstream_first_token":
        assert abs(d.evidence["upstream_applied_mean"] - float(u[0, 0])) < FIT_TOLERANCE[dtype] * fit.spread
        assert d.evidence["upstream_first_weight"] == float(u[0, 0]) > 0
    else:
        assert d.evidence["upstream_misplaced"] > 0.8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seed", range(4))
def test_a_correct_path_under_random_per_token_weights_stays_clean(seed, dtype):
    result, _ = _check(None, dtype, seed=seed)
    assert result.diagnosis.variant == "within_budget/clean", result.diagnosis.summary


def test_a_masked_first_token_zeroes_every_gradient_and_is_named():
    """Liger-Kernel issue 968's "grad = 0": the first token is padding, its weight 0 is applied to every token."""
    result, u = _check("upstream_first_token", torch.float32, first_masked=True)
    d = result.diagnosis
    assert float(u[0, 0]) == 0 and d.variant == "upstream_broadcast/first_token"
    assert d.evidence["grad_hidden_norm_ratio"] == 0 and "dL/dh is 0 on every token" in d.summary


def test_a_constant_upstream_hides_a_broadcast_and_the_check_is_clean():
    """One weight for every token (``loss.sum()``): the first token's is everyone's, nothing is wrong."""
    result, _ = _check("upstream_first_token", torch.float32, upstream=torch.full((S, B), 0.5))
    assert result.diagnosis.variant == "within_budget/clean" and result.report.upstream_fit is None


def test_a_scale_of_the_weights_is_a_scale_not_a_broadcast_or_an_order():
    """The weights divided by the tokens in backward (a mean taken again), with a first weight as small as those:
    every applied weight is near the first one, yet the tokens' own weights scaled explain them, and sorted they are
    the upstream's only at that scale."""
    _, _, _, u = _inputs(torch.float32)
    u[0, 0] = float(u[u != 0].mean()) / (S * B)
    result, _ = _check("backward_scale", torch.float32, upstream=u)
    fit = result.report.upstream_fit
    assert result.diagnosis.variant == "backward_scale/pure_factor", result.diagnosis.summary
    assert fit.first_residual < 0.1 and fit.scaled_residual < 1e-6 and abs(fit.own_scale * S * B - 1) < 1e-6
    assert fit.sorted_residual < 1e-6 and abs(fit.sorted_scale * S * B - 1) < 1e-6


def test_the_fit_is_in_the_report_as_plain_json():
    result, _ = _check("upstream_transposed", torch.bfloat16)
    record = json.loads(json.dumps(result.report.to_dict()))
    assert record["upstream_fit"]["transposed_read"] == f"its [{B},{S}] buffer read as [{S},{B}]"
    assert json.loads(json.dumps(result.diagnosis.to_dict()))["evidence"]["upstream_shape"] == f"[{S},{B}]"


# --- two ranks: vocab slices at TP = 2 ---------------------------------------------------------------------------


def _two_rank(rank: int, world: int) -> dict[str, tuple[str, dict]]:
    rows = slice(rank * V // 2, (rank + 1) * V // 2)
    contract = CEContract(vocab_size=V, reduction="none", layout="[S,B,V/TP]", vocab_start=rows.start,
                          vocab_end=rows.stop, tp_group=dist.group.WORLD)
    found = {}
    for dtype in (torch.float32, torch.bfloat16):
        for fault in FAULTS:
            result, u = _check(fault, dtype, contract=contract, weight_rows=rows)
            found[f"{fault}-{dtype}"] = (result.diagnosis.variant, dict(result.diagnosis.evidence),
                                         float(u[0, 0]))
    return found


@pytest.fixture(scope="module")
def two_rank_checks():
    return run_distributed(_two_rank, 2)


@pytest.mark.distributed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fault", list(FAULTS), ids=str)
def test_two_rank_paths_are_named_or_clean_on_every_rank(two_rank_checks, fault, dtype):
    for rank, checks in enumerate(two_rank_checks):
        variant, evidence, first = checks[f"{fault}-{dtype}"]
        assert variant == FAULTS[fault], (rank, evidence)
        if fault == "upstream_first_token":
            assert abs(evidence["upstream_applied_mean"] - first) < FIT_TOLERANCE[dtype] * evidence["upstream_spread"]
        if fault == "upstream_transposed":
            assert evidence["upstream_transposed_residual"] < FIT_TOLERANCE[dtype]


def test_a_flat_per_token_loss_is_held_to_the_targets_shaped_reference():
    """``F.cross_entropy(logits.view(-1, V), y.view(-1), reduction='none')`` returns (N,) for [S,B] targets: compared
    flat (it raised a shape error before), and its upstream read as [S,B] for the transposes."""
    hidden, weight, targets, u = _inputs(torch.float32)
    contract = CEContract(vocab_size=V, reduction="none")
    for fault, variant in (("upstream_transposed", "upstream_order/transposed"), (None, "within_budget/clean")):
        fused = broken_fused(hidden, weight, targets, contract, fault, grad_output=u)
        flat = type(fused)(loss=fused.loss.reshape(-1), grad_hidden=fused.grad_hidden, grad_weight=fused.grad_weight)
        result = check_seam(SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=flat,
                                       upstream=u.reshape(-1)), contract)
        assert result.diagnosis.variant == variant, result.diagnosis.summary
        assert result.report.per_token_max_abs_diff < 1e-5
    assert result.report.upstream_fit is None and json.dumps(result.report.to_dict())
