"""One deliberately broken fused path per diagnosis class, judged by compare() + diagnose()."""

import math

import pytest
import torch

from broken_paths import broken_fused
from ce_guard.budget import ErrorBudget, native_error_budget
from ce_guard.contract import CEContract
from ce_guard.diagnosis import Cause, diagnose
from ce_guard.fused import FusedLinearCrossEntropy
from ce_guard.parity import SeamOutputs, compare
from ce_guard.reference import reference_linear_cross_entropy


def check(hidden, weight, targets, contract, fault=None, group_sizes=None, **kwargs):
    fused = broken_fused(hidden, weight, targets, contract, fault, **kwargs)
    reference = reference_linear_cross_entropy(hidden, weight, targets, contract)
    budget = native_error_budget(hidden, weight, targets, contract)
    report = compare(fused, reference, contract, budget=budget)
    return report, diagnose(report, group_sizes=group_sizes)


def inputs(dtype, n=512, d=64, v=8000):
    hidden = torch.randn(n, d).to(dtype)
    weight = (torch.randn(v, d) * 0.2).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[::7] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1, z_loss=1e-4, softcap=5.0)])
def test_correct_path_is_within_budget(dtype, options):
    hidden, weight, targets = inputs(dtype)
    report, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000, **options))
    assert diagnosis.cause is Cause.WITHIN_BUDGET and not diagnosis.drift, diagnosis.summary
    assert report.within_budget and diagnosis.summary.startswith("within budget: loss rel err")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_missing_accumulation_divide_is_k_equals_grad_accum(dtype):
    hidden, weight, targets = inputs(dtype)
    _, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000), "grad_scale", scale=4,
                         group_sizes={"grad_accum": 4})
    assert diagnosis.cause is Cause.NORMALIZATION_SCALE and diagnosis.evidence["k"] == 4
    assert "k = 4 = grad_accum size" in diagnosis.summary and diagnosis.fault_row == 2


def test_scale_with_no_matching_group_says_so():
    hidden, weight, targets = inputs(torch.float32)
    _, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000), "grad_scale", scale=3,
                         group_sizes={"DP": 2})
    assert diagnosis.cause is Cause.NORMALIZATION_SCALE
    assert "k = 3 matches no parallel group or accumulation size" in diagnosis.summary


def scaled_fused_layer(loss_factor, pad_every, n=1024, d=32, v=8192):
    """ce_guard's fused layer in bf16 at the power benchmark's shapes, its loss times ``loss_factor``."""
    hidden = torch.randn(n, d).bfloat16()
    weight = torch.nn.Parameter((torch.randn(v, d) * 2 / d ** 0.5).bfloat16())
    targets = torch.randint(0, v, (n,))
    targets[::pad_every] = -100
    contract = CEContract(vocab_size=v)
    h = hidden.clone().requires_grad_()
    loss = FusedLinearCrossEntropy(d, contract, weight=weight)(h, targets) * loss_factor
    loss.backward()
    fused = SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=weight.grad)
    reference = reference_linear_cross_entropy(hidden, weight.detach(), targets, contract)
    budget = native_error_budget(hidden, weight.detach(), targets, contract)
    report = compare(fused, reference, contract, budget=budget)
    return report, diagnose(report)


def test_small_bf16_scale_the_gradients_carry_is_named():
    # 960 visible tokens: 1/960 rounds up in bf16, and both gradients carry the 1.003 past what rounding
    # alone can do (2^-8), in the same direction as the loss: a scale, though within the gradients' budgets.
    report, diagnosis = scaled_fused_layer(1.003, pad_every=16)
    assert report.grad_hidden_rel_err < report.budget.grad_hidden_rel
    assert diagnosis.cause is Cause.NORMALIZATION_SCALE, diagnosis.summary
    assert math.isclose(diagnosis.evidence["scale"], 1.003, rel_tol=1e-4)


def test_bf16_loss_factor_the_gradients_do_not_carry_is_not_a_scale():
    # 992 visible tokens: bf16 rounding of dL/dz swallows most of the 1.003 (the gradients read about
    # 1.002, as a correct bf16 path can): only the loss shows it, and the diagnosis says so.
    report, diagnosis = scaled_fused_layer(1.003, pad_every=32)
    assert abs(report.grad_hidden_norm_ratio - 1) < report.budget.grad_scale
    assert diagnosis.cause is Cause.UNEXPLAINED and "only the loss is off" in diagnosis.summary


def test_bf16_rounded_pure_scale_is_named():
    hidden, weight, targets = inputs(torch.bfloat16)
    contract = CEContract(vocab_size=8000)
    reference = reference_linear_cross_entropy(hidden, weight, targets, contract)
    fused = SeamOutputs(loss=reference.loss * 1.005, grad_hidden=(reference.grad_hidden * 1.005).bfloat16(),
                        grad_weight=(reference.grad_weight * 1.005).bfloat16())
    budget = native_error_budget(hidden, weight, targets, contract)
    report = compare(fused, reference, contract, budget=budget)
    assert report.grad_hidden_rel_err < report.budget.grad_hidden_rel
    assert diagnose(report).cause is Cause.NORMALIZATION_SCALE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_in_the_denominator(dtype):
    hidden, weight, targets = inputs(dtype)
    _, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000), "ignore_in_denominator")
    assert diagnosis.cause is Cause.IGNORE_INDEX_LEAK
    assert "divides by all tokens including ignored ones (512)" in diagnosis.summary
    assert diagnosis.evidence["fused_divisor"] == 512 and diagnosis.evidence["contract_divisor"] == 438


def test_padding_gathered_as_class_zero():
    hidden, weight, targets = inputs(torch.float32)
    report, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000), "ignored_as_class_zero")
    assert diagnosis.cause is Cause.IGNORE_INDEX_LEAK and report.grad_hidden_ignored_norm > 0
    assert "non-zero on ignored tokens" in diagnosis.summary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_missing_z_loss_is_a_penalty_boundary(dtype):
    hidden, weight, targets = inputs(dtype)
    report, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000, z_loss=1e-3), "missing_z_loss")
    assert diagnosis.cause is Cause.Z_LOSS_BOUNDARY and diagnosis.fault_row == 8
    assert math.isclose(report.loss_offset_per_token, -1e-3 * report.mean_lse_sq, rel_tol=0.02)
    assert "z-loss is missing from the fused path" in diagnosis.summary


def test_bf16_accumulators_drift_at_many_chunks():
    hidden, weight, targets = inputs(torch.bfloat16, n=2048, d=32, v=4000)
    contract = CEContract(vocab_size=4000)
    _, clean = check(hidden, weight, targets, contract, chunks=128)
    _, diagnosis = check(hidden, weight, targets, contract, "bf16_accumulators", chunks=128)
    assert clean.cause is Cause.WITHIN_BUDGET
    assert diagnosis.cause is Cause.ACCUMULATOR_DTYPE and "worst on dL/dW" in diagnosis.summary


def test_bf16_accumulators_under_an_fp32_contract_are_obvious():
    hidden, weight, targets = inputs(torch.float32)
    _, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000), "bf16_accumulators")
    assert diagnosis.cause is Cause.ACCUMULATOR_DTYPE and diagnosis.evidence["excess_dL/dW"] > 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filtered_backward_is_a_gradient_approximation(dtype):
    hidden, weight, targets = inputs(dtype)
    _, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000), "coarse_backward")
    assert diagnosis.cause is Cause.GRADIENT_APPROXIMATION and "loss exact" in diagnosis.summary
    assert diagnosis.evidence["grad_hidden_magnitude_coupling"] < 1.3, diagnosis.evidence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks", [128, 512])
def test_hidden_gradient_summed_in_bf16_is_an_accumulator_not_a_filter(dtype, blocks):
    """Cut CE 25.1.1's dL/de: loss exact, dL/dh short, each element rounded relative to its own size."""
    hidden, weight, targets = inputs(dtype)
    report, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000), "bf16_grad_hidden_sum",
                              chunks=blocks)
    assert diagnosis.cause is Cause.ACCUMULATOR_DTYPE, diagnosis.summary
    assert "its sum over vocab blocks" in diagnosis.summary and "short" in diagnosis.summary
    assert report.loss_rel_err <= report.budget.loss_rel and report.grad_hidden_norm_ratio < 1
    assert diagnosis.evidence["grad_hidden_magnitude_coupling"] > 2.0, diagnosis.evidence


def test_nan_is_reported_never_averaged_away():
    hidden, weight, targets = inputs(torch.float32)
    _, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000), "nan")
    assert diagnosis.cause is Cause.NON_FINITE and diagnosis.evidence == {"nonfinite_fused_loss": 1}


def test_non_finite_input_is_a_diagnosis_not_a_crash():
    hidden, weight, targets = inputs(torch.float32)
    hidden[5, 1] = float("inf")
    _, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000))
    assert diagnosis.cause is Cause.NON_FINITE and diagnosis.evidence["nonfinite_input_hidden"] == 1


def test_all_padding_check_is_skipped_not_drift():
    hidden, weight, _ = inputs(torch.float32)
    targets = torch.full((hidden.shape[0],), -100)
    _, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=8000))
    assert diagnosis.cause is Cause.NO_VISIBLE_TOKENS and not diagnosis.drift


def test_loss_on_an_all_padding_batch_is_a_leak():
    hidden, weight, _ = inputs(torch.float32)
    targets = torch.full((hidden.shape[0],), -100)
    contract = CEContract(vocab_size=8000)
    reference = reference_linear_cross_entropy(hidden, weight, targets, contract)
    fused = SeamOutputs(loss=torch.tensor(3.0), grad_hidden=torch.zeros_like(hidden))
    diagnosis = diagnose(compare(fused, reference, contract))
    assert diagnosis.cause is Cause.IGNORE_INDEX_LEAK and diagnosis.drift


def test_default_budget_follows_the_fused_dtype():
    strict, loose = ErrorBudget.for_dtype(torch.float32), ErrorBudget.for_dtype(torch.bfloat16)
    assert strict.grad_hidden_rel < loose.grad_hidden_rel / 50
    assert strict.loss_rel < strict.grad_hidden_rel


def test_dw_budget_keeps_its_margin_at_a_vocab_far_larger_than_the_sample():
    """128 sampled tokens leave most rows of a 65k vocab's dW without a target, where native rounding nearly
    vanishes; a budget earned there would shrink with V while the fused error does not (on GPU the bf16
    margin rose from 0.36 at V = 32k to 0.79 at 262k). dL/dh, dense at any V, bounds it from below."""
    g = torch.Generator().manual_seed(3)
    n, d, v = 1024, 64, 65536
    hidden = torch.randn(n, d, generator=g).bfloat16()
    weight = torch.nn.Parameter((torch.randn(v, d, generator=g) * 2 / d ** 0.5).bfloat16())
    targets = torch.randint(0, v, (n,), generator=g)
    contract = CEContract(vocab_size=v)
    h = hidden.clone().requires_grad_()
    loss = FusedLinearCrossEntropy(d, contract, weight=weight)(h, targets)
    loss.backward()
    fused = SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=weight.grad)
    budget = native_error_budget(hidden, weight.detach(), targets, contract)
    report = compare(fused, reference_linear_cross_entropy(hidden, weight.detach(), targets, contract),
                     contract, budget=budget)
    assert budget.grad_weight_rel >= budget.grad_hidden_rel
    # No closer to its budget than a correct path at small V (0.21-0.25 of it on CPU); 0.29 before the bound.
    assert report.grad_weight_rel_err / budget.grad_weight_rel < 0.25


def test_report_is_json_ready():
    import json

    hidden, weight, targets = inputs(torch.float32, n=64, v=100)
    report, diagnosis = check(hidden, weight, targets, CEContract(vocab_size=100))
    text = json.dumps({"report": report.to_dict(), "diagnosis": diagnosis.to_dict()})
    assert '"cause": "within_budget"' in text and '"vocab_size": 100' in text


def test_mismatched_gradient_shapes_are_refused():
    hidden, weight, targets = inputs(torch.float32, n=64, v=100)
    contract = CEContract(vocab_size=100)
    reference = reference_linear_cross_entropy(hidden, weight, targets, contract)
    fused = SeamOutputs(loss=reference.loss, grad_hidden=torch.zeros(32, 64))
    with pytest.raises(ValueError, match=r"fused gradient shape \(32, 64\) does not match"):
        compare(fused, reference, contract)
