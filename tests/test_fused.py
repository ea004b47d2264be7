"""FusedLinearCrossEntropy against float64 ``F.cross_entropy`` on materialised logits, one rank.

The oracle here is plain PyTorch in float64 (z-loss and softcap added by hand), never ce_guard's own
reference, so the fused path is checked against an independent derivation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ce_guard.contract import CEContract
from ce_guard.fused import FusedLinearCrossEntropy, fused_linear_cross_entropy
from ce_guard.testing import FaultyFusedLinearCrossEntropy, fused_layer

IGNORE = -100
N, D, V = 47, 31, 123  # odd on purpose: no chunk size divides N, no power of two anywhere

OPTIONS = {
    "plain": dict(),
    "ignore": dict(ignore_every=4),
    "smoothing": dict(label_smoothing=0.1, ignore_every=5),
    "z_loss": dict(z_loss=1e-2, ignore_every=6),
    "softcap": dict(softcap=3.0, ignore_every=7),
    "all": dict(label_smoothing=0.2, z_loss=1e-3, softcap=4.0, ignore_every=3),
}


def make_inputs(n=N, d=D, v=V, *, dtype=torch.float32, ignore_every=0, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        targets[::ignore_every] = IGNORE
    return hidden, weight, targets


def oracle(hidden, weight, targets, *, reduction, label_smoothing=0.0, z_loss=0.0, softcap=None, upstream=None):
    """float64 loss, dh, dW from materialised logits and PyTorch's own cross-entropy."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = h @ w.T  # (N, V)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = targets != IGNORE
    per_token = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE,
                                label_smoothing=label_smoothing)
    per_token = per_token + z_loss * torch.logsumexp(logits, dim=-1).square() * valid
    loss = {"mean": lambda: per_token.sum() / valid.sum(), "sum": per_token.sum, "none": lambda: per_token}[reduction]()
    upstream = torch.ones_like(loss) if upstream is None else upstream.double()
    dh, dw = torch.autograd.grad(loss, (h, w), upstream)
    return loss.detach(), dh, dw


def run_fused(hidden, weight, targets, contract, *, token_chunk=None, fault=None, fault_scale=2, upstream=None):
    head = fused_layer(hidden.shape[-1], contract, weight=nn.Parameter(weight.clone()), token_chunk=token_chunk,
                       fault=fault, fault_scale=fault_scale)
    h = hidden.clone().requires_grad_()
    loss = head(h, targets)
    upstream = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    dh, dw = torch.autograd.grad(loss, (h, head.weight), upstream)
    return loss.detach(), dh, dw


def rel_err(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def assert_close_to(actual, expected, rtol):
    """Elementwise, with an absolute floor scaled to the tensor's largest entry."""
    floor = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=floor)


def contract_for(option, reduction, accum_dtype=torch.float32):
    kwargs = {k: v for k, v in OPTIONS[option].items() if k != "ignore_every"}
    return CEContract(vocab_size=V, reduction=reduction, accum_dtype=accum_dtype, **kwargs), kwargs


@pytest.mark.parametrize("token_chunk", [5, 16, 47, None])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_matches_float64_pytorch(reduction, option, token_chunk):
    hidden, weight, targets = make_inputs(ignore_every=OPTIONS[option].get("ignore_every", 0))
    contract, kwargs = contract_for(option, reduction)
    # Non-uniform upstream grads for `none`: a scalar broadcast would hide a wrong per-token weighting.
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1)) if reduction == "none" else None
    loss, dh, dw = run_fused(hidden, weight, targets, contract, token_chunk=token_chunk, upstream=upstream)
    ref_loss, ref_dh, ref_dw = oracle(hidden, weight, targets, reduction=reduction, upstream=upstream, **kwargs)
    assert_close_to(loss, ref_loss, 1e-5)
    assert_close_to(dh, ref_dh, 1e-5)
    assert_close_to(dw, ref_dw, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_accumulators_are_exact(reduction):
    hidden, weight, targets = make_inputs(dtype=torch.float64, ignore_every=3)
    contract, kwargs = contract_for("all", reduction, accum_dtype=torch.float64)
    upstream = torch.linspace(-1, 2, N, dtype=torch.float64) if reduction == "none" else None
    loss, dh, dw = run_fused(hidden, weight, targets, contract, token_chunk=8, upstream=upstream)
    ref_loss, ref_dh, ref_dw = oracle(hidden, weight, targets, reduction=reduction, upstream=upstream, **kwargs)
    assert_close_to(loss, ref_loss, 1e-12)
    assert_close_to(dh, ref_dh, 1e-12)
    assert_close_to(dw, ref_dw, 1e-12)


def native_bf16_errors(hidden, weight, targets, reduction, **kwargs):
    """What plain PyTorch gets at bf16 (bf16 matmul, fp32 CE): the budget a bf16 fused path must meet."""
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logits = (h @ w.T).float()
    per_token = F.cross_entropy(logits, targets, reduction="none", ignore_index=IGNORE, **kwargs)
    loss = per_token.sum() / (targets != IGNORE).sum() if reduction == "mean" else per_token.sum()
    dh, dw = torch.autograd.grad(loss, (h, w))
    ref_loss, ref_dh, ref_dw = oracle(hidden, weight, targets, reduction=reduction, **kwargs)
    return rel_err(loss, ref_loss), rel_err(dh, ref_dh), rel_err(dw, ref_dw)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bf16_within_native_bf16_budget(reduction):
    hidden, weight, targets = make_inputs(256, 64, 1000, dtype=torch.bfloat16, ignore_every=17)
    contract = CEContract(vocab_size=1000, reduction=reduction, label_smoothing=0.1)
    loss, dh, dw = run_fused(hidden, weight, targets, contract, token_chunk=32)
    ref_loss, ref_dh, ref_dw = oracle(hidden, weight, targets, reduction=reduction, label_smoothing=0.1)
    native_loss, native_dh, native_dw = native_bf16_errors(hidden, weight, targets, reduction, label_smoothing=0.1)
    # Same error sources as native bf16 (logit and gradient rounding) and no more: within 1.5x of it.
    assert rel_err(loss, ref_loss) <= 1.5 * native_loss + 1e-6
    assert rel_err(dh, ref_dh) <= 1.5 * native_dh
    assert rel_err(dw, ref_dw) <= 1.5 * native_dw
    assert rel_err(dh, ref_dh) < 5e-3 and rel_err(dw, ref_dw) < 5e-3


def test_all_ignored_mean_is_zero_not_nan():
    hidden, weight, targets = make_inputs()
    targets[:] = IGNORE
    # PyTorch's own mean over zero visible tokens is 0/0 = NaN; the layer promises 0 loss and zero grads.
    assert torch.isnan(F.cross_entropy(hidden @ weight.T, targets, ignore_index=IGNORE))
    loss, dh, dw = run_fused(hidden, weight, targets, CEContract(vocab_size=V, z_loss=1e-3), token_chunk=10)
    assert loss.item() == 0.0
    assert not dh.any() and not dw.any()


def test_ignored_tokens_get_no_gradient_in_none():
    hidden, weight, targets = make_inputs(ignore_every=2)
    loss, dh, _ = run_fused(hidden, weight, targets, CEContract(vocab_size=V, reduction="none", label_smoothing=0.1),
                            token_chunk=7, upstream=torch.randn(N))
    ignored = targets == IGNORE
    assert not loss[ignored].any() and not dh[ignored].any()


def test_batched_shapes_keep_their_layout():
    hidden, weight, targets = make_inputs(4 * 11, 16, 50)
    contract = CEContract(vocab_size=50, reduction="none")
    head = FusedLinearCrossEntropy(16, contract, weight=nn.Parameter(weight), token_chunk=9)
    h = hidden.reshape(4, 11, 16).requires_grad_()
    loss = head(h, targets.reshape(4, 11))
    assert loss.shape == (4, 11)
    loss.sum().backward()
    assert h.grad.shape == (4, 11, 16)
    torch.testing.assert_close(loss.reshape(-1).double(), oracle(hidden, weight, targets, reduction="none")[0],
                               rtol=1e-5, atol=1e-5)


def test_functional_form_equals_module_and_eval_skips_gradients(monkeypatch):
    hidden, weight, targets = make_inputs(ignore_every=3)
    contract = CEContract(vocab_size=V, label_smoothing=0.1)
    head = FusedLinearCrossEntropy(D, contract, weight=nn.Parameter(weight.clone()), token_chunk=9)
    functional = fused_linear_cross_entropy(hidden, head.weight, targets, contract=contract, token_chunk=9)
    torch.testing.assert_close(functional, head(hidden, targets), rtol=0, atol=0)
    # Under no_grad the forward must not compute the gradients it computes in training.
    monkeypatch.setattr("ce_guard.fused_chunk.logit_grad", lambda *a, **k: pytest.fail("gradient computed in eval"))
    with torch.no_grad():
        torch.testing.assert_close(head(hidden, targets), functional.detach(), rtol=0, atol=0)


def test_retain_graph_second_backward_gives_the_same_grads():
    hidden, weight, targets = make_inputs(ignore_every=3)
    head = FusedLinearCrossEntropy(D, CEContract(vocab_size=V), weight=nn.Parameter(weight), token_chunk=9)
    h = hidden.clone().requires_grad_()
    loss = head(h, targets)
    first = torch.autograd.grad(loss, (h, head.weight), retain_graph=True)
    second = torch.autograd.grad(loss, (h, head.weight))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_borrowed_weight_is_shared_with_tied_embedding():
    embedding = nn.Embedding(V, D)
    head = FusedLinearCrossEntropy(D, CEContract(vocab_size=V), weight=embedding.weight, token_chunk=16)
    tokens = torch.randint(0, V, (N,))
    head(embedding(tokens), torch.roll(tokens, -1)).backward()
    assert head.weight is embedding.weight
    assert embedding.weight.grad is not None and embedding.weight.grad.abs().sum() > 0


def test_bf16_accum_dtype_is_selectable_and_equals_the_fault():
    hidden, weight, targets = make_inputs(ignore_every=5)
    declared = run_fused(hidden, weight, targets, CEContract(vocab_size=V, accum_dtype=torch.bfloat16), token_chunk=4)
    faulty = run_fused(hidden, weight, targets, CEContract(vocab_size=V), token_chunk=4,
                       fault="bf16_accumulators")
    assert declared[0].dtype == torch.float32  # the loss total stays fp32; the contract's accumulators do not
    for a, b in zip(declared, faulty):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("layer", "kwargs", "match"), [
    (FusedLinearCrossEntropy, dict(weight=nn.Parameter(torch.zeros(V + 1, D))),
     r"weight.*\(123, 31\), found \(124, 31\)"),
    (FusedLinearCrossEntropy, dict(weight=torch.zeros(V, D)), r"nn.Parameter"),
    (FusedLinearCrossEntropy, dict(token_chunk=0), r"token_chunk"),
    (FaultyFusedLinearCrossEntropy, dict(fault="not_a_fault"), r"fault"),
    (FaultyFusedLinearCrossEntropy, dict(fault="grad_scale", fault_scale=0), r"fault_scale"),
])
def test_constructor_rejects_bad_arguments(layer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        layer(D, CEContract(vocab_size=V), **kwargs)


def test_vocab_slice_without_tp_group_is_rejected():
    contract = CEContract(vocab_size=V, layout="[S,B,V/TP]", vocab_start=0, vocab_end=60)
    with pytest.raises(ValueError, match="tp_group"):
        FusedLinearCrossEntropy(D, contract)


def test_forward_rejects_bad_inputs():
    head = FusedLinearCrossEntropy(D, CEContract(vocab_size=V))
    with pytest.raises(ValueError, match="hidden_size=31"):
        head(torch.randn(N, D + 1), torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        head(torch.randn(N, D), torch.zeros(N, dtype=torch.int32))
    with pytest.raises(ValueError, match="targets"):
        head(torch.randn(N, D), torch.zeros(N + 1, dtype=torch.long))


# --- faults: each must change the numbers exactly as docs/faults.md says -------------------------------------


def f64_run(contract_kwargs, *, fault=None, fault_scale=2, reduction="mean", ignore_every=4, upstream=None):
    hidden, weight, targets = make_inputs(dtype=torch.float64, ignore_every=ignore_every)
    contract = CEContract(vocab_size=V, reduction=reduction, accum_dtype=torch.float64, **contract_kwargs)
    out = run_fused(hidden, weight, targets, contract, token_chunk=10, fault=fault, fault_scale=fault_scale,
                    upstream=upstream)
    return out, (hidden, weight, targets)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grad_scale_multiplies_loss_and_grads_by_k(reduction):
    upstream = torch.linspace(-1, 1, N, dtype=torch.float64) if reduction == "none" else None
    (loss, dh, dw), _ = f64_run(dict(z_loss=1e-3), reduction=reduction, upstream=upstream)
    (bad_loss, bad_dh, bad_dw), _ = f64_run(dict(z_loss=1e-3), reduction=reduction, upstream=upstream,
                                            fault="grad_scale", fault_scale=3)
    torch.testing.assert_close(bad_loss, 3 * loss, rtol=1e-13, atol=0)
    torch.testing.assert_close(bad_dh, 3 * dh, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(bad_dw, 3 * dw, rtol=1e-13, atol=1e-15)


def test_missing_z_loss_offset_is_z_times_mean_lse_squared():
    z = 1e-2
    (loss, dh, _), (hidden, weight, targets) = f64_run(dict(z_loss=z))
    (bad_loss, bad_dh, _), _ = f64_run(dict(z_loss=z), fault="missing_z_loss")
    valid = targets != IGNORE
    lse = torch.logsumexp(hidden @ weight.T, dim=-1)[valid]
    assert (loss - bad_loss).item() == pytest.approx(z * lse.square().mean().item(), rel=1e-12)
    assert rel_err(bad_dh, dh) > 1e-3  # dL/dh differs by 2 z lse softmax


def test_ignore_in_denominator_scales_by_visible_fraction():
    (loss, dh, _), (_, _, targets) = f64_run({}, ignore_every=4)
    (bad_loss, bad_dh, _), _ = f64_run({}, ignore_every=4, fault="ignore_in_denominator")
    visible_fraction = (targets != IGNORE).sum().item() / N  # 35/47: not an integer ratio
    assert (bad_loss / loss).item() == pytest.approx(visible_fraction, rel=1e-12)
    torch.testing.assert_close(bad_dh, dh * visible_fraction, rtol=1e-12, atol=1e-15)


def test_bf16_accumulators_blow_the_dw_budget():
    """Declared fp32, accumulated in bf16: dW error far above the honest path, loss error least."""
    hidden, weight, targets = make_inputs(1024, 64, 1000, dtype=torch.bfloat16, ignore_every=17)
    contract = CEContract(vocab_size=1000)
    ref_loss, ref_dh, ref_dw = oracle(hidden, weight, targets, reduction="mean")
    honest = run_fused(hidden, weight, targets, contract, token_chunk=8)
    faulty = run_fused(hidden, weight, targets, contract, token_chunk=8, fault="bf16_accumulators")
    assert rel_err(faulty[2], ref_dw) > 3 * rel_err(honest[2], ref_dw)
    assert rel_err(faulty[2], ref_dw) > rel_err(faulty[0], ref_loss)


@pytest.mark.parametrize("fault", ["unmasked_partition_targets", "partition_off_by_one", "smoothing_local_vocab",
                                   "gathered_logits_log_tp", "local_normalization"])
def test_partition_and_group_faults_are_invisible_on_one_rank(fault):
    """docs/faults.md rows 1, 4, 6, 7: TP=1 (and a token group of one) is clean; test_fused_tp shows them at 2."""
    (loss, dh, dw), _ = f64_run(dict(label_smoothing=0.1))
    (bad_loss, bad_dh, bad_dw), _ = f64_run(dict(label_smoothing=0.1), fault=fault)
    for a, b in ((loss, bad_loss), (dh, bad_dh), (dw, bad_dw)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- property: any shape, any chunk ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 40), d=st.integers(1, 12), v=st.integers(2, 40), chunk=st.integers(1, 50),
       reduction=st.sampled_from(["mean", "sum", "none"]), eps=st.sampled_from([0.0, 0.3]),
       seed=st.integers(0, 2**16))
def test_any_shape_and_chunk_matches_float64(n, d, v, chunk, reduction, eps, seed):
    hidden, weight, targets = make_inputs(n, d, v, dtype=torch.float64, ignore_every=3, seed=seed)
    contract = CEContract(vocab_size=v, reduction=reduction, label_smoothing=eps, z_loss=1e-3,
                          accum_dtype=torch.float64)
    upstream = torch.rand(n, dtype=torch.float64) if reduction == "none" else None
    loss, dh, dw = run_fused(hidden, weight, targets, contract, token_chunk=chunk, upstream=upstream)
    if n == 0 or not (targets != IGNORE).any():
        assert loss.abs().sum() == 0 and not dh.any() and not dw.any()
        return
    ref = oracle(hidden, weight, targets, reduction=reduction, label_smoothing=eps, z_loss=1e-3, upstream=upstream)
    for actual, expected in zip((loss, dh, dw), ref):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_default_token_chunk_never_degenerates_to_a_few_tokens():
    from ce_guard.fused import MIN_TOKEN_CHUNK, _default_token_chunk

    # Liger's rule alone gives 2 tokens at D=128, V=100352: a chunk loop that ran for a minute on CPU.
    assert _default_token_chunk(1024, 100352, 128) == MIN_TOKEN_CHUNK
    assert _default_token_chunk(16384, 32768, 4096) == 2048
