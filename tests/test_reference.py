"""The reference against float64 autograd on small shapes, every contract option, fp32 and bf16 inputs."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from ce_guard import _compile, reference
from ce_guard.contract import CEContract
from ce_guard.reference import reference_linear_cross_entropy
from memory_probe import AllocationProbe

OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss=1e-3),
    "softcap": dict(softcap=2.5),
    "all": dict(label_smoothing=0.2, z_loss=1e-2, softcap=4.0),
}


def float64_loss(hidden, weight, targets, contract, grad_output=None):
    """Textbook CE in float64 with autograd: F.cross_entropy plus z-loss and softcap by hand."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    z = h.reshape(-1, h.shape[-1]) @ w.T
    if contract.softcap is not None:
        z = contract.softcap * torch.tanh(z / contract.softcap)
    y = targets.reshape(-1)
    visible = y != contract.ignore_index
    per_token = F.cross_entropy(z, y, reduction="none", ignore_index=contract.ignore_index,
                                label_smoothing=contract.label_smoothing)
    per_token = per_token + contract.z_loss * torch.logsumexp(z, dim=1).square() * visible
    if contract.reduction == "none":
        loss = per_token.reshape(targets.shape)
        loss.backward(grad_output.double())
    else:
        loss = per_token.sum() / (visible.sum() if contract.reduction == "mean" else 1)
        loss.backward()
    return loss.detach(), h.grad, w.grad


def make_inputs(n=47, d=31, v=123, dtype=torch.float32, ignore_every=5):
    hidden = torch.randn(n, d).to(dtype)
    weight = (torch.randn(v, d) / math.sqrt(d) * 2).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[::ignore_every] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_matches_float64(option, reduction, dtype):
    hidden, weight, targets = make_inputs(dtype=dtype)
    contract = CEContract(vocab_size=weight.shape[0], reduction=reduction, **OPTIONS[option])
    grad_output = torch.rand(targets.shape) * 2 if reduction == "none" else 1.0
    # Chunks smaller than the shapes and not dividing them: 47 tokens in 8s, 123 classes in blocks of 17.
    result = reference_linear_cross_entropy(hidden, weight, targets, contract, grad_output=grad_output,
                                            token_chunk=8, chunk_elements=8 * 17)
    loss, grad_h, grad_w = float64_loss(hidden, weight, targets, contract,
                                        grad_output if reduction == "none" else None)
    # The reference upcasts bf16 inputs exactly, so both dtypes are held to fp32 accuracy.
    torch.testing.assert_close(result.loss.double(), loss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(result.grad_hidden.double(), grad_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.grad_weight.double(), grad_w, rtol=1e-5, atol=1e-6)
    assert result.grad_hidden.dtype == torch.float32 and result.grad_hidden.shape == hidden.shape


def test_per_token_losses_are_zero_on_ignored_tokens():
    hidden, weight, targets = make_inputs()
    result = reference_linear_cross_entropy(hidden, weight, targets, CEContract(vocab_size=123, reduction="none"))
    ignored = targets == -100
    assert torch.all(result.loss[ignored] == 0) and torch.all(result.loss[~ignored] > 0)
    assert torch.all(result.grad_hidden[ignored] == 0)


def test_three_dimensional_layout_keeps_shapes():
    hidden, weight, targets = torch.randn(6, 3, 16), torch.randn(40, 16), torch.randint(0, 40, (6, 3))
    contract = CEContract(vocab_size=40, reduction="none")
    result = reference_linear_cross_entropy(hidden, weight, targets, contract, grad_output=torch.ones(6, 3))
    loss, grad_h, _ = float64_loss(hidden, weight, targets, contract, torch.ones(6, 3))
    assert result.loss.shape == (6, 3) and result.grad_hidden.shape == (6, 3, 16)
    torch.testing.assert_close(result.loss.double(), loss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(result.grad_hidden.double(), grad_h, rtol=1e-5, atol=1e-6)


def test_all_ignored_batch_is_zero_where_torch_gives_nan():
    hidden, weight, _ = make_inputs()
    targets = torch.full((hidden.shape[0],), -100)
    result = reference_linear_cross_entropy(hidden, weight, targets, CEContract(vocab_size=weight.shape[0]))
    # The contract defines an all-padding mean as 0 with zero gradients; torch divides 0 by 0.
    assert math.isnan(float(F.cross_entropy(hidden @ weight.T, targets)))
    assert float(result.loss) == 0.0 and result.n_visible == 0
    assert torch.count_nonzero(result.grad_hidden) == 0 and torch.count_nonzero(result.grad_weight) == 0


def test_empty_batch_returns_zero_and_shaped_gradients():
    hidden, weight, targets = torch.empty(0, 8), torch.randn(20, 8), torch.empty(0, dtype=torch.long)
    for reduction in ("mean", "sum"):
        result = reference_linear_cross_entropy(hidden, weight, targets,
                                                CEContract(vocab_size=20, reduction=reduction))
        assert float(result.loss) == 0.0 and result.grad_hidden.shape == (0, 8)
        assert torch.count_nonzero(result.grad_weight) == 0


def test_no_gradient_pass_when_not_asked():
    hidden, weight, targets = make_inputs()
    result = reference_linear_cross_entropy(hidden, weight, targets, CEContract(vocab_size=123), grad_output=None)
    assert result.grad_hidden is None and result.grad_weight is None


def test_user_tf32_setting_is_restored_and_not_used():
    hidden, weight, targets = make_inputs()
    torch.set_float32_matmul_precision("high")
    try:
        reference_linear_cross_entropy(hidden, weight, targets, CEContract(vocab_size=123))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision("highest")


@given(
    n=st.integers(1, 70), d=st.integers(1, 20), v=st.integers(2, 90),
    token_chunk=st.integers(1, 32), chunk_elements=st.integers(1, 500),
    reduction=st.sampled_from(["mean", "sum"]), smoothing=st.sampled_from([0.0, 0.15]),
    ignore_fraction=st.floats(0.0, 1.0),
)
def test_chunking_never_changes_the_answer(n, d, v, token_chunk, chunk_elements, reduction, smoothing,
                                           ignore_fraction):
    gen = torch.Generator().manual_seed(n * 1000 + v)
    hidden, weight = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignore_fraction] = -100
    contract = CEContract(vocab_size=v, reduction=reduction, label_smoothing=smoothing)
    result = reference_linear_cross_entropy(hidden, weight, targets, contract, token_chunk=token_chunk,
                                            chunk_elements=chunk_elements)
    loss, grad_h, grad_w = float64_loss(hidden, weight, targets, contract)
    if contract.reduction == "mean" and not (targets != -100).any():
        loss = torch.zeros((), dtype=torch.float64)  # the contract's all-padding mean
        grad_h, grad_w = torch.zeros_like(grad_h), torch.zeros_like(grad_w)
    torch.testing.assert_close(result.loss.double(), loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.grad_hidden.double(), grad_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.grad_weight.double(), grad_w, rtol=1e-4, atol=1e-5)


FP16_UNIT_ROUNDOFF = 2.0 ** -11  # the fp16 backward's one rounding of the logit gradient, per element


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_fp16_backward_stays_within_one_fp16_rounding(option, reduction):
    """The GPU default for bf16 inputs, emulated on CPU (fp16 x fp16 is exact in fp32, as on tensor cores).

    Upstream weights a billion apart check the per-token scale: the smallest token's dL/dh is as accurate
    as the largest's, where one scale for the chunk would flush its gradient to fp16 zero.
    """
    hidden, weight, targets = make_inputs(dtype=torch.bfloat16)
    contract = CEContract(vocab_size=weight.shape[0], reduction=reduction, **OPTIONS[option])
    grad_output = 1.0
    if reduction == "none":
        grad_output = torch.rand(targets.shape) * 2
        grad_output[1], grad_output[2] = 1e-6, 1e3
    result = reference_linear_cross_entropy(hidden, weight, targets, contract, grad_output=grad_output,
                                            token_chunk=8, chunk_elements=8 * 17, backward_dtype=torch.float16)
    loss, grad_h, grad_w = float64_loss(hidden, weight, targets, contract,
                                        grad_output if reduction == "none" else None)
    torch.testing.assert_close(result.loss.double(), loss, rtol=2e-6, atol=2e-6)  # the forward stays exact
    row_err = (result.grad_hidden.double() - grad_h).norm(dim=1) / grad_h.norm(dim=1)
    assert float(row_err[grad_h.norm(dim=1) > 0].max()) < FP16_UNIT_ROUNDOFF
    assert float((result.grad_weight.double() - grad_w).norm() / grad_w.norm()) < FP16_UNIT_ROUNDOFF


@pytest.mark.parametrize("hidden_scale, weight_scale", [(2.0 ** 20, 2.0 ** -20), (2.0 ** -30, 2.0 ** 25)])
def test_fp16_backward_scales_operands_into_range(hidden_scale, weight_scale):
    """Hidden states past fp16's 65504 and weights under its normals would overflow or flush unscaled."""
    hidden, weight, targets = make_inputs(dtype=torch.bfloat16)
    hidden, weight = (hidden.float() * hidden_scale).bfloat16(), (weight.float() * weight_scale).bfloat16()
    contract = CEContract(vocab_size=weight.shape[0])
    result = reference_linear_cross_entropy(hidden, weight, targets, contract, backward_dtype=torch.float16)
    _, grad_h, grad_w = float64_loss(hidden, weight, targets, contract)
    assert float((result.grad_hidden.double() - grad_h).norm() / grad_h.norm()) < FP16_UNIT_ROUNDOFF
    assert float((result.grad_weight.double() - grad_w).norm() / grad_w.norm()) < FP16_UNIT_ROUNDOFF


def test_peak_memory_is_bounded_by_the_chunk_not_by_n_times_v():
    n, d, v = 2048, 64, 20000
    hidden, weight, targets = torch.randn(n, d), torch.randn(v, d) * 0.1, torch.randint(0, v, (n,))
    contract = CEContract(vocab_size=v)
    chunk_elements = 1 << 18
    with AllocationProbe() as probe:
        reference_linear_cross_entropy(hidden, weight, targets, contract, chunk_elements=chunk_elements,
                                       token_chunk=256)
    returned = (n * d + v * d) * 4  # the fp32 gradients it hands back
    full_logits = n * v * 4
    assert probe.stats.peak_bytes - returned <= 12 * chunk_elements * 4, probe.stats
    assert probe.stats.peak_bytes < full_logits / 5

    # The probe does catch a path that materialises the logits.
    with AllocationProbe() as probe:
        F.cross_entropy(hidden @ weight.T, targets)
    assert probe.stats.largest_bytes >= full_logits


BAD_INPUTS = [
    ("hidden (5, 8) vs targets (4,)", lambda: (torch.randn(5, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)),
     r"leading shape equal to targets' \(4,\)"),
    ("weight with the wrong width", lambda: (torch.randn(4, 8), torch.randn(10, 7), torch.zeros(4, dtype=torch.long)),
     r"`weight` must be this rank's vocab slice \[0, 10\) as \(10, 8\), got \(10, 7\)"),
    ("dtype mix", lambda: (torch.randn(4, 8), torch.randn(10, 8).bfloat16(), torch.zeros(4, dtype=torch.long)),
     r"must share a dtype"),
    ("float targets", lambda: (torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4)),
     r"`targets` must be an integer tensor"),
    ("target out of range", lambda: (torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 10, 3])),
     r"found 10 at \(2,\)"),
    ("negative target", lambda: (torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, -1, 2, 3])),
     r"or ignore_index=-100; found -1 at \(1,\)"),
    ("integer hidden", lambda: (torch.ones(4, 8, dtype=torch.long), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)),
     r"must be floating point"),
    ("1-d hidden", lambda: (torch.randn(8), torch.randn(10, 8), torch.zeros((), dtype=torch.long)),
     r"`hidden` must be \[\.\.\., D\]"),
]


@pytest.mark.parametrize("name, make, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_named(name, make, message):
    hidden, weight, targets = make()
    with pytest.raises(ValueError, match=message):
        reference_linear_cross_entropy(hidden, weight, targets, CEContract(vocab_size=10))


def test_slice_without_a_tp_group_is_refused():
    contract = CEContract(vocab_size=10, layout="[S,B,V/TP]", vocab_start=0, vocab_end=5)
    with pytest.raises(ValueError, match="TP group has one rank"):
        reference_linear_cross_entropy(torch.randn(2, 1, 4), torch.randn(5, 4), torch.zeros(2, 1, dtype=torch.long),
                                       contract)


def test_none_reduction_needs_one_upstream_value_per_token():
    hidden, weight, targets = make_inputs()
    with pytest.raises(ValueError, match="one value per token"):
        reference_linear_cross_entropy(hidden, weight, targets, CEContract(vocab_size=123, reduction="none"),
                                       grad_output=torch.ones(3))


def test_non_finite_inputs_are_counted_not_hidden():
    hidden, weight, targets = make_inputs()
    hidden[3, 2] = float("nan")
    weight[7, 0] = float("inf")
    result = reference_linear_cross_entropy(hidden, weight, targets, CEContract(vocab_size=123))
    assert result.nonfinite_inputs == {"hidden": 1, "weight": 1}
    assert not math.isfinite(float(result.loss))


def test_backward_dtype_other_than_fp16_or_fp32_is_refused():
    hidden, weight, targets = make_inputs()
    with pytest.raises(ValueError, match="`backward_dtype` must be None, torch.float16 or torch.float32"):
        reference_linear_cross_entropy(hidden, weight, targets, CEContract(vocab_size=123),
                                       backward_dtype=torch.bfloat16)


def test_fp16_backward_of_no_tokens_is_zero_not_an_error():
    contract = CEContract(vocab_size=10)
    result = reference_linear_cross_entropy(torch.randn(0, 4).bfloat16(), torch.randn(10, 4).bfloat16(),
                                            torch.zeros(0, dtype=torch.long), contract, backward_dtype=torch.float16)
    assert float(result.loss) == 0.0 and result.grad_hidden.shape == (0, 4)
    assert not result.grad_weight.any()


def test_a_compiler_failure_falls_back_to_the_eager_function_once(monkeypatch):
    """An Inductor bug must not cost the check: the block function runs eagerly, with one warning, from then
    on."""
    calls = []

    def broken_compile(fn):
        def compiled(*args):
            calls.append(fn.__name__)
            raise AssertionError("Loop-carried variable accum0 has initial type fp32")
        return compiled

    def block_sum(x):
        return x.sum(dim=1)

    monkeypatch.setattr(_compile, "_COMPILE_FAILED", set())
    monkeypatch.setattr(_compile, "_compiled", broken_compile)
    x = torch.randn(3, 4)
    fn = _compile.compiled_on_cuda(block_sum, torch.device("cuda"))
    with pytest.warns(UserWarning, match="torch.compile failed on block_sum .*runs eagerly"):
        torch.testing.assert_close(fn(x), x.sum(dim=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(fn(x), x.sum(dim=1))  # the same callable, on the next block
        assert _compile.compiled_on_cuda(block_sum, torch.device("cuda")) is block_sum
    assert calls == ["block_sum"]
    assert _compile.compiled_on_cuda(block_sum, torch.device("cpu")) is block_sum


@pytest.mark.parametrize("softcap, multiplier", [(None, 1.0), (30.0, 0.3)])
def test_the_logit_gradient_block_compiled_equals_the_eager_one(softcap, multiplier):
    """The target's term is a column mask where the block runs compiled (it fuses into the kernel that writes
    the block) and an index into each row's target column where it runs eagerly: the same numbers, the term
    subtracted once where the target is in the block and nowhere else."""
    gen = torch.Generator().manual_seed(0)
    t, v = 64, 1000
    raw = torch.randn(t, v, generator=gen) * 3
    lse = torch.logsumexp(raw, dim=1)
    prob_scale, hit = torch.rand(t, generator=gen), torch.rand(t, generator=gen)
    uniform = torch.rand(t, generator=gen) * 1e-4
    target_col = torch.randint(-300, v + 300, (t,), generator=gen)  # in the block and on either side of it
    args = (raw, lse, prob_scale, uniform, hit, target_col, multiplier, softcap, torch.float32)
    eager = reference._block_logit_grad(*args)
    torch.testing.assert_close(_compile._compiled(reference._block_logit_grad)(*args), eager)
    z = multiplier * raw if softcap is None else softcap * torch.tanh(multiplier * raw / softcap)
    onehot = F.one_hot(target_col.clamp(0, v - 1), v) * ((target_col >= 0) & (target_col < v))[:, None]
    expected = torch.exp(z - lse[:, None]) * prob_scale[:, None] - uniform[:, None] - hit[:, None] * onehot
    if softcap is not None:
        expected = expected * (1 - (z / softcap).square())
    torch.testing.assert_close(eager, expected)
