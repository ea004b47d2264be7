"""Hypothesis-driven bad and extreme inputs to the public API: a clear error or a correct verdict, nothing else."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ce_guard import CEContract, SeamOutputs, SeamRecord, check_seam, reference_linear_cross_entropy
from ce_guard.diagnosis import Cause

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool]


def _textbook(hidden, weight, targets):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    loss = F.cross_entropy(h.reshape(-1, h.shape[-1]) @ w.T, targets.reshape(-1))
    loss.backward()
    return loss.detach(), h.grad, w.grad


@given(hidden_dtype=st.sampled_from(DTYPES), weight_dtype=st.sampled_from(DTYPES),
       target_dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.float32, torch.bool]))
def test_dtype_mixes_are_accepted_or_named(hidden_dtype, weight_dtype, target_dtype):
    hidden = torch.ones(4, 3).to(hidden_dtype)
    weight = torch.ones(5, 3).to(weight_dtype)
    targets = torch.tensor([0, 1, 2, 3]).to(target_dtype)
    contract = CEContract(vocab_size=5)
    valid = (hidden_dtype.is_floating_point and hidden_dtype == weight_dtype
             and not target_dtype.is_floating_point and target_dtype != torch.bool)
    if valid:
        result = reference_linear_cross_entropy(hidden, weight, targets, contract)
        assert math.isfinite(float(result.loss))
    else:
        with pytest.raises(ValueError, match="`hidden`|`weight`|`targets`"):
            reference_linear_cross_entropy(hidden, weight, targets, contract)


@given(n=st.integers(0, 6), d=st.integers(1, 5), v=st.integers(2, 7), extra=st.integers(-2, 2),
       which=st.sampled_from(["hidden_rows", "hidden_dim", "weight_rows", "targets_rank"]))
def test_shape_mismatches_are_named(n, d, v, extra, which):
    hidden, weight, targets = torch.randn(n, d), torch.randn(v, d), torch.zeros(n, dtype=torch.long)
    if extra == 0:
        return
    if which == "hidden_rows":
        hidden = torch.randn(max(n + extra, 0), d)
        if hidden.shape[0] == n:
            return
    elif which == "hidden_dim":
        hidden = torch.randn(n, max(d + extra, 1))
        if hidden.shape[1] == d:
            return
    elif which == "weight_rows":
        weight = torch.randn(max(v + extra, 1), d)
        if weight.shape[0] == v:
            return
    else:
        targets = torch.zeros(n, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"must be|must have"):
        reference_linear_cross_entropy(hidden, weight, targets, CEContract(vocab_size=v))


@given(seed=st.integers(0, 10_000), transpose=st.booleans(), expand=st.booleans(), step=st.integers(1, 3))
def test_non_contiguous_and_expanded_inputs_give_the_textbook_answer(seed, transpose, expand, step):
    gen = torch.Generator().manual_seed(seed)
    n, d, v = 9, 4, 11
    hidden = torch.randn(d, n * step, generator=gen).T[::step] if transpose else torch.randn(n, d, generator=gen)
    weight = torch.randn(1, d, generator=gen).expand(v, d) if expand else torch.randn(v, d, generator=gen)
    targets = torch.randint(0, v, (n * 2,), generator=gen)[::2]
    result = reference_linear_cross_entropy(hidden, weight, targets, CEContract(vocab_size=v))
    loss, grad_h, grad_w = _textbook(hidden, weight, targets)
    torch.testing.assert_close(result.loss.double(), loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.grad_hidden.double(), grad_h, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.grad_weight.double(), grad_w, rtol=1e-4, atol=1e-6)


@given(log_scale=st.floats(0.0, 40.0), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       z_loss=st.sampled_from([0.0, 1e-4]))
def test_extreme_logits_end_in_a_verdict_never_an_exception(log_scale, dtype, z_loss):
    """Logits from 1 up to the dtype's limit: the check returns a named cause; overflow is `non_finite`."""
    torch.manual_seed(0)
    scale = 10.0 ** (log_scale / 2)
    hidden = (torch.randn(16, 8) * scale).to(dtype)
    weight = (torch.randn(12, 8) * scale).to(dtype)
    targets = torch.randint(0, 12, (16,))
    contract = CEContract(vocab_size=12, z_loss=z_loss)
    # The fused path here is PyTorch's own materialised CE in fp32: a correct implementation.
    h, w = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    z = h @ w.T
    loss = F.cross_entropy(z, targets) + z_loss * torch.logsumexp(z, 1).square().mean()
    loss.backward()
    fused = SeamOutputs(loss=loss.detach(), grad_hidden=h.grad.to(dtype), grad_weight=w.grad.to(dtype))
    result = check_seam(SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0), contract)
    finite_inputs = bool(torch.isfinite(hidden).all() and torch.isfinite(weight).all())
    finite_outputs = math.isfinite(float(loss)) and bool(torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all())
    if not (finite_inputs and finite_outputs):
        assert result.diagnosis.cause is Cause.NON_FINITE
    else:
        assert isinstance(result.diagnosis.cause, Cause)  # a verdict, whatever the rounding at these magnitudes
        if log_scale < 4 and z_loss == 0:
            assert result.diagnosis.cause is Cause.WITHIN_BUDGET, result.diagnosis.summary


@given(n=st.integers(0, 20), reduction=st.sampled_from(["mean", "sum", "none"]))
def test_ignore_only_and_empty_batches_are_zero(n, reduction):
    hidden, weight = torch.randn(n, 4), torch.randn(6, 4)
    targets = torch.full((n,), -100)
    result = reference_linear_cross_entropy(hidden, weight, targets, CEContract(vocab_size=6, reduction=reduction))
    assert torch.count_nonzero(result.loss) == 0 and torch.count_nonzero(result.grad_hidden) == 0
    fused = SeamOutputs(loss=result.loss.clone(), grad_hidden=torch.zeros(n, 4))
    check = check_seam(SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0),
                       CEContract(vocab_size=6, reduction=reduction))
    assert check.diagnosis.cause is Cause.NO_VISIBLE_TOKENS and not check.diagnosis.drift


@given(start=st.integers(-3, 12), end=st.integers(-3, 12), layout=st.sampled_from(["[N,V]", "[S,B,V/TP]", "[V,N]"]))
def test_contracts_that_contradict_their_layout_are_refused(start, end, layout):
    valid = layout != "[V,N]" and 0 <= start < end <= 10 and (layout != "[N,V]" or (start, end) == (0, 10))
    if valid:
        contract = CEContract(vocab_size=10, layout=layout, vocab_start=start, vocab_end=end)
        if not contract.is_full_vocab:  # a slice with no TP group to reduce over is refused at call time
            with pytest.raises(ValueError, match="TP group has one rank"):
                reference_linear_cross_entropy(torch.randn(2, 1, 3), torch.randn(end - start, 3),
                                               torch.zeros(2, 1, dtype=torch.long), contract)
    else:
        with pytest.raises(ValueError, match="`layout`|vocab slice|layout '\\[N,V\\]'"):
            CEContract(vocab_size=10, layout=layout, vocab_start=start, vocab_end=end)


@given(which=st.sampled_from(["grad_hidden", "grad_weight"]), cut=st.integers(1, 3))
def test_fused_outputs_of_the_wrong_shape_are_named(which, cut):
    hidden, weight, targets = torch.randn(8, 4), torch.randn(6, 4), torch.randint(0, 6, (8,))
    good = {"grad_hidden": torch.zeros(8, 4), "grad_weight": torch.zeros(6, 4)}
    good[which] = good[which][:-cut]
    fused = SeamOutputs(loss=torch.tensor(1.0), **good)
    with pytest.raises(ValueError, match="fused gradient shape"):
        check_seam(SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=1.0),
                   CEContract(vocab_size=6))
