"""The signature fit and the verdicts it names at the margin, in bf16 where a norm cannot resolve them."""

import math

import pytest
import torch
from broken_paths import broken_fused
from dist_helpers import run_distributed

from ce_guard import CEContract, SeamRecord, check_seam
from ce_guard.budget import _expected_mean_error, native_error_budget
from ce_guard.diagnosis import Cause, margins
from ce_guard.parity import SeamOutputs
from ce_guard.reference import reference_linear_cross_entropy
from ce_guard.signature import fit_signatures
from ce_guard.testing import FaultyFusedLinearCrossEntropy

N, D, V = 2048, 128, 32768  # the shape at which a 1.002x bf16 scale used to be named at 4 of 12 checks


def _inputs(seed: int, dtype: torch.dtype, *, n: int = N, d: int = D, v: int = V, pad: float = 0.05, spread: float = 2.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * (spread / d ** 0.5)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.randperm(n, generator=gen)[:round(pad * n)]] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def _check(hidden, weight, targets, contract, fused: SeamOutputs):
    record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0)
    return check_seam(record, contract)


def _pytorchs_own(hidden, weight, targets, factor: float = 1.0) -> SeamOutputs:
    """PyTorch's native bf16 path: ``F.linear`` forward, fp32 cross-entropy (times ``factor``), and the backward's
    two bf16 GEMMs (``torch.mm``: exact products summed in fp32, rounded once) on the bf16 logit gradient autograd
    hands ``F.linear``. dL/dh multiplies a column-major copy of the weight, which the CPU GEMM runs on every thread
    where the layout ``F.linear``'s backward passes runs on one (2 s against 15-18 s at the test shape); only the
    order of its fp32 sum differs."""
    h = hidden.detach().requires_grad_()
    z = torch.nn.functional.linear(h, weight).detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy(z.float(), targets) * factor
    (grad_z,) = torch.autograd.grad(loss, z)
    return SeamOutputs(loss=loss.detach(), grad_hidden=torch.mm(grad_z, weight.t().contiguous().t()),
                       grad_weight=torch.mm(grad_z.t(), hidden))


def _layer_outputs(layer, hidden, targets) -> SeamOutputs:
    h = hidden.detach().requires_grad_()
    loss = layer(h, targets)
    loss.backward()
    return SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=layer.weight.grad)


def test_fit_reads_an_exact_scale_and_nothing_else():
    hidden, weight, targets = _inputs(0, torch.float64, n=256, d=32, v=512)
    contract = CEContract(vocab_size=512)
    ref = reference_linear_cross_entropy(hidden, weight, targets, contract)
    grad = ref.grad_hidden.double()  # the reference hands back fp32 gradients; scale them without rounding
    fit = fit_signatures(hidden, weight, targets, 1.0037 * grad, grad, ref.token_weight, contract)
    assert fit.scale == pytest.approx(0.0037, rel=1e-9)
    assert abs(fit.target) < 1e-12 and abs(fit.shift) < 1e-9 and fit.residual_rel < 1e-12


def test_fit_reads_a_wrong_denominator_as_equal_scale_and_target_coefficients():
    """sum-exp off by (1 + eps) per token scales each softmax by 1 / (1 + eps): the error lies along u_i m_i,
    which is r_i + u_i t_i without smoothing."""
    hidden, weight, targets = _inputs(1, torch.float64, n=256, d=32, v=512)
    contract = CEContract(vocab_size=512)
    ref = reference_linear_cross_entropy(hidden, weight, targets, contract)
    visible = targets != -100
    logits = hidden @ weight.T
    probs = torch.softmax(logits, dim=1)
    u = 1.0 / int(visible.sum())
    wrong = (probs / 1.002) @ weight - weight[targets.clamp(min=0)]
    fused = torch.where(visible[:, None], u * wrong, 0.0)
    fit = fit_signatures(hidden, weight, targets, fused, ref.grad_hidden, ref.token_weight, contract)
    assert fit.scale == pytest.approx(1 / 1.002 - 1, rel=1e-4)
    assert fit.target == pytest.approx(fit.scale, rel=1e-4)  # to the fp32 rounding of the reference gradient


def test_fit_reads_the_uniform_shift_of_local_v_smoothing():
    """Smoothing's uniform term over half the vocabulary at TP = 2 adds -eps * u * mean row on every token."""
    hidden, weight, targets = _inputs(2, torch.float64, n=256, d=32, v=512)
    contract = CEContract(vocab_size=512, label_smoothing=0.1)
    ref = reference_linear_cross_entropy(hidden, weight, targets, contract)
    u = 1.0 / int((targets != -100).sum())
    shifted = ref.grad_hidden - 0.1 * u * weight.mean(dim=0) * (targets != -100)[:, None]
    fit = fit_signatures(hidden, weight, targets, shifted, ref.grad_hidden, ref.token_weight, contract)
    assert fit.shift == pytest.approx(-0.1, rel=1e-6)
    assert fit.sigmas("shift") > 100 and abs(fit.scale) < 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_a_1_002x_bf16_scale_is_named_with_its_effect_size(seed):
    """The norm ratio cannot tell 0.2% from bf16 rounding (one roundoff is 0.39%); the fit on dL/dh's own
    direction can, and the loss agrees with it."""
    hidden, weight, targets = _inputs(seed, torch.bfloat16)
    contract = CEContract(vocab_size=V)
    result = _check(hidden, weight, targets, contract,
                    broken_fused(hidden, weight, targets, contract, "grad_scale", scale=1.002))
    assert result.diagnosis.cause == Cause.NORMALIZATION_SCALE, result.diagnosis.summary
    fit = result.report.signature
    assert fit.scale == pytest.approx(0.002, abs=4 * fit.scale_se + 1e-4) and fit.sigmas("scale") > 20
    assert "sigma" in result.diagnosis.summary


def test_a_fused_loss_of_zero_reads_no_pure_scale():
    """A loss factor of -1 (the fused loss is zero) cannot be a scale's: the fit keeps the native path at u."""
    hidden, weight, targets = _inputs(4, torch.bfloat16, n=256, d=32, v=512)
    contract = CEContract(vocab_size=512)
    ref = reference_linear_cross_entropy(hidden, weight, targets, contract)
    fit = fit_signatures(hidden, weight, targets, ref.grad_hidden.to(torch.bfloat16), ref.grad_hidden,
                         ref.token_weight, contract, loss_factor=-1.0)
    assert fit.pure_scale is None and math.isfinite(fit.softmax_spread)


@pytest.mark.parametrize("spread", [12.0, 24.0])
def test_pytorchs_own_bf16_path_scaled_on_confident_tokens_is_named_a_scale(spread):
    """PyTorch's native path with its loss times 1.002: the token weight enters the logit gradient before its
    bf16 rounding, which on peaked softmaxes moves the fitted scale off the loss's factor by a roundoff (read
    0.0013 to 0.0019 here). The fit's pure scale, its native path run at the loss's factor, reads the same
    offset, so the verdict names the scale, and not the mean's bf16 1/count (1/1946 rounded is 1.0022x)."""
    for seed in range(2):
        hidden, weight, targets = _inputs(seed, torch.bfloat16, spread=spread)
        result = _check(hidden, weight, targets, CEContract(vocab_size=V),
                        _pytorchs_own(hidden, weight, targets, factor=1.002))
        assert result.diagnosis.cause == Cause.NORMALIZATION_SCALE, result.diagnosis.summary
        fit = result.report.signature
        assert fit.scale == pytest.approx(fit.pure_scale, abs=3 * fit.scale_se)


@pytest.mark.parametrize("seed", range(3))
def test_a_correct_bf16_path_carries_no_fitted_scale(seed):
    """bf16 rounding of the common target term -1/n puts a factor on the target direction, not on the scale."""
    hidden, weight, targets = _inputs(seed, torch.bfloat16)
    contract = CEContract(vocab_size=V)
    fused = broken_fused(hidden, weight, targets, contract)
    ref = reference_linear_cross_entropy(hidden, weight, targets, contract)
    fit = fit_signatures(hidden, weight, targets, fused.grad_hidden, ref.grad_hidden, ref.token_weight, contract)
    assert fit.sigmas("scale") < 5
    assert fit.sigmas("target") > 20 and abs(fit.target) < 2.0 ** -8


@pytest.mark.parametrize("chunks", [1, 256])  # one bf16 running sum, and 256 of them added in bf16
def test_bf16_accumulators_under_bf16_inputs_are_named_from_the_fit(chunks):
    """Flagged by the loss alone (dL/dh within its budget), the fault is named from the fit, never unexplained
    and never a scale: the loss and dL/dh may share one factor (the mean's 1/count rounded to bf16, as a
    genuine scale of that size would), but each token's softmax is off by its own rounded lse."""
    causes = []
    for seed in range(1, 7):
        hidden, weight, targets = _inputs(seed, torch.bfloat16)
        contract = CEContract(vocab_size=V)
        layer = FaultyFusedLinearCrossEntropy(D, contract, weight=torch.nn.Parameter(weight.clone()),
                                              fault="bf16_accumulators", token_chunk=math.ceil(N / chunks))
        result = _check(hidden, weight, targets, contract, _layer_outputs(layer, hidden, targets))
        assert result.report.grad_hidden_rel_err <= result.report.budget.grad_hidden_rel
        causes.append(result.diagnosis.cause)
    flagged = [c for c in causes if c != Cause.WITHIN_BUDGET]
    assert len(flagged) >= 5 and set(flagged) == {Cause.ACCUMULATOR_DTYPE}, causes


@pytest.mark.parametrize("spread", [2.0, 12.0])
def test_the_native_path_the_fit_compares_against_is_pytorchs_own(spread):
    """Handed PyTorch's native bf16 gradients as the fused path's, the fit finds their per-token softmax
    spread equal to its own emulation's: the yardstick is the native path, rounding for rounding."""
    hidden, weight, targets = _inputs(3, torch.bfloat16, spread=spread)
    contract = CEContract(vocab_size=V)
    native = _pytorchs_own(hidden, weight, targets)
    ref = reference_linear_cross_entropy(hidden, weight, targets, contract)
    fit = fit_signatures(hidden, weight, targets, native.grad_hidden, ref.grad_hidden, ref.token_weight, contract)
    assert fit.softmax_spread == pytest.approx(1.0, abs=0.02)


def test_a_clean_fp32_check_pays_for_no_fit():
    hidden, weight, targets = _inputs(0, torch.float32, n=256, d=32, v=2048)
    contract = CEContract(vocab_size=2048)
    result = _check(hidden, weight, targets, contract, broken_fused(hidden, weight, targets, contract))
    assert result.diagnosis.cause == Cause.WITHIN_BUDGET and result.report.signature is None


@pytest.mark.parametrize("seed", range(3))
def test_a_clean_bf16_check_is_fitted_and_its_softmax_spreads_as_the_native_paths(seed):
    hidden, weight, targets = _inputs(seed, torch.bfloat16)
    contract = CEContract(vocab_size=V)
    result = _check(hidden, weight, targets, contract, broken_fused(hidden, weight, targets, contract))
    assert result.report.signature is not None and margins(result.report)["softmax"] < 0.5
    assert result.diagnosis.cause == Cause.WITHIN_BUDGET and result.report.within_budget


@pytest.mark.parametrize("chunks", [1, 16])
def test_bf16_accumulators_within_every_budget_are_flagged_by_the_softmax_spread_alone(chunks):
    """With 2048 visible tokens 1/count is exact in bf16, so the fault is only each token's rounded lse: unbiased,
    it cancels in the mean. At this seed loss and gradients are within budget; the per-token spread is not."""
    hidden, weight, targets = _inputs(4, torch.bfloat16, pad=0.0)
    contract = CEContract(vocab_size=V)
    layer = FaultyFusedLinearCrossEntropy(D, contract, weight=torch.nn.Parameter(weight.clone()),
                                          fault="bf16_accumulators", token_chunk=math.ceil(N / chunks))
    result = _check(hidden, weight, targets, contract, _layer_outputs(layer, hidden, targets))
    m = margins(result.report)
    assert max(m["loss"], m["grad_hidden"], m["grad_weight"]) <= 1 < m["softmax"]
    assert not result.report.within_budget and result.diagnosis.drift
    assert result.diagnosis.cause == Cause.ACCUMULATOR_DTYPE
    assert result.diagnosis.summary.startswith("each token's softmax is off by its own factor")


def test_the_expected_mean_error_keeps_only_a_bias_the_sample_can_see():
    zero_mean = torch.tensor([1.0, -1.0] * 128, dtype=torch.float64)
    assert _expected_mean_error(zero_mean, n_averaged=4096) == pytest.approx(1 / 64)
    biased = zero_mean + 1.0
    assert _expected_mean_error(biased, n_averaged=4096) == pytest.approx(math.hypot(1 - 3 / 16, 1 / 64))


def test_the_loss_budget_is_steady_on_peaked_logits():
    """Large logits (as a trained model has) make each token's bf16 rounding large; the sample mean of 256 of
    them then swung the budget 25x between checks, the spread over the averaged count does not."""
    contract = CEContract(vocab_size=4096)
    budgets = []
    for seed in range(12):
        hidden, weight, targets = _inputs(seed, torch.bfloat16, n=4096, d=64, v=4096, spread=12.0)
        budgets.append(native_error_budget(hidden, weight, targets, contract, sample_tokens=256).loss_rel)
    assert max(budgets) / min(budgets) <= 2.0, budgets


def _tp2_fit(rank: int, world: int, seed: int) -> tuple[float, ...]:
    import torch.distributed as dist

    hidden, weight, targets = _inputs(seed, torch.float64, n=256, d=32, v=512)
    full = CEContract(vocab_size=512, label_smoothing=0.1)
    sliced = CEContract(vocab_size=512, label_smoothing=0.1, layout="[S,B,V/TP]", vocab_start=256 * rank,
                        vocab_end=256 * (rank + 1), tp_group=dist.group.WORLD)
    ref = reference_linear_cross_entropy(hidden, weight, targets, full)
    fused = 1.01 * ref.grad_hidden + 1e-4 * torch.randn(ref.grad_hidden.shape, dtype=torch.float64,
                                                        generator=torch.Generator().manual_seed(seed))
    whole = fit_signatures(hidden, weight, targets, fused, ref.grad_hidden, ref.token_weight, full)
    split = fit_signatures(hidden, weight[256 * rank:256 * (rank + 1)], targets, fused, ref.grad_hidden,
                           ref.token_weight, sliced)
    return tuple(getattr(f, k) for f in (whole, split) for k in ("scale", "scale_se", "target", "shift"))


@pytest.mark.distributed
def test_the_fit_over_two_vocab_slices_equals_the_fit_over_the_whole_vocabulary():
    for ranks in run_distributed(_tp2_fit, 2, 3):
        whole, split = ranks[:4], ranks[4:]
        assert split == pytest.approx(whole, rel=1e-6, abs=1e-12)
