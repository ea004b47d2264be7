"""One verdict: ``compare`` + ``diagnose`` say what ``check_seam`` says, and the thresholds reach both."""

import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from ce_guard import CEContract, SeamOutputs, SeamRecord, Thresholds, check_seam, compare, diagnose
from ce_guard import reference_linear_cross_entropy
from ce_guard.budget import ErrorBudget, native_error_budget
from ce_guard.diagnosis import judged, over_budget
from ce_guard.signature import fit_signatures

N, D, V = 2048, 32, 4096


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(V, D, generator=g) * (2 / D ** 0.5)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::16] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def _native(hidden, weight, targets, fault):
    """PyTorch's own path (logits in the input dtype, softmax in fp32), scaled by 4 or with each token's sum-exp
    rounded to bf16 (a narrow softmax statistic: each token's softmax off by its own factor)."""
    h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    z = F.linear(h, w).float()  # (N, V)
    if fault == "narrow_sum_exp":
        top = z.detach().amax(dim=1, keepdim=True)
        sum_exp = torch.exp(z - top).sum(dim=1)
        sum_exp = sum_exp + (sum_exp.bfloat16().float() - sum_exp).detach()  # rounded value, exact gradient path
        visible = targets != -100
        target_logit = z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
        loss = torch.where(visible, top.squeeze(1) + torch.log(sum_exp) - target_logit, 0.0).sum() / visible.sum()
    else:
        loss = F.cross_entropy(z, targets) * (4 if fault == "scaled" else 1)
    loss.backward()
    return SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=w.grad)


@functools.cache
def _both_ways(dtype, fault, thresholds=None):
    """check_seam's result, and the exported path's: compare, the fit where check_seam fitted, diagnose."""
    hidden, weight, targets = _inputs(dtype)
    contract = CEContract(vocab_size=V)
    fused = _native(hidden, weight, targets, fault)
    result = check_seam(SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0),
                        contract, thresholds=thresholds)
    reference = reference_linear_cross_entropy(hidden, weight, targets, contract, grad_output=1.0)
    report = compare(fused, reference, contract, budget=native_error_budget(hidden, weight, targets, contract,
                                                                            sample_tokens=256))
    if result.report.signature is not None:
        fit = fit_signatures(hidden, weight, targets, fused.grad_hidden, reference.grad_hidden, reference.token_weight,
                             contract, loss_factor=report.loss_ratio - 1)
        report = dataclasses.replace(report, signature=fit)
    return result, report


@pytest.mark.parametrize(("dtype", "fault", "variant"), [
    (torch.float32, "clean", "within_budget/clean"),
    (torch.float32, "scaled", "normalization_scale/integer_k"),
    (torch.bfloat16, "clean", "within_budget/clean"),
    (torch.bfloat16, "narrow_sum_exp", "accumulator_dtype/narrow_softmax"),
])
def test_compare_and_diagnose_agree_with_check_seam(dtype, fault, variant):
    result, report = _both_ways(dtype, fault)
    assert result.diagnosis.variant == variant, result.diagnosis.summary
    assert diagnose(report).to_dict() == result.diagnosis.to_dict()
    assert judged(report).within_budget == result.report.within_budget == (variant == "within_budget/clean")
    assert judged(report).to_dict() == result.report.to_dict()


def test_thresholds_reach_the_verdict_and_the_diagnosis():
    """A narrow sum-exp is drift by its softmax margin alone; a line far out lets it through, in both paths."""
    lenient = Thresholds(flag_spread_sigmas=1e6)
    strict, report = _both_ways(torch.bfloat16, "narrow_sum_exp")
    passed, _ = _both_ways(torch.bfloat16, "narrow_sum_exp", lenient)
    assert over_budget(report) == ("softmax",) and not strict.report.within_budget
    assert passed.report.within_budget and passed.diagnosis.variant == "within_budget/clean"
    assert over_budget(report, lenient) == () and diagnose(report, thresholds=lenient).variant == "within_budget/clean"


def test_over_budget_names_each_quantity_over_its_line_and_a_nan_is_over():
    _, report = _both_ways(torch.float32, "clean")
    assert over_budget(report) == ()
    b = report.budget
    worse = dataclasses.replace(report, loss_rel_err=2 * b.loss_rel, grad_weight_rel_err=math.nan,
                                per_token_max_abs_diff=2 * b.per_token_abs, nonfinite={"fused_loss": 1})
    assert over_budget(worse) == ("non_finite", "loss", "per_token", "grad_weight")
    assert not judged(worse).within_budget
    at_the_line = dataclasses.replace(report, budget=ErrorBudget(**{**dataclasses.asdict(b),
                                                                    "loss_rel": report.loss_rel_err}))
    assert over_budget(at_the_line) == ()
