"""The fused layer's CUDA fast path: the Triton chunk kernel, its dispatch rule, chunk size and grad hand-over.

The kernel runs on CUDA where there is one, else under Triton's CPU interpreter, else those tests skip;
the dispatch rule, chunk rule and backward hand-over are plain Python and run everywhere. The kernel is
held to the plain-torch chunk math and, through the whole layer, to float64 ``F.cross_entropy``.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from test_fused import OPTIONS, N, V, assert_close_to, contract_for, make_inputs, oracle, run_fused
from torch import nn

from ce_guard import fused, fused_kernel
from ce_guard._matmul import FP32_REDUCTION_BLOCK, reduction_blocks
from ce_guard.contract import CEContract
from ce_guard.fused import FusedLinearCrossEntropy
from ce_guard.fused_chunk import ChunkMath, torch_chunk
from ce_guard.testing import LAYER_FAULTS, faulty_chunk_math

KERNEL_OPTIONS = [option for option in OPTIONS if "softcap" not in OPTIONS[option]]  # softcap stays on torch


@pytest.fixture
def kernel_device():
    """'cuda', or 'cpu' under Triton's interpreter (conftest.py sets it up); skips without Triton."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_kernel(fn, *args, **kwargs):
    """Calls ``fn``; skips where Triton's CPU interpreter cannot run on this numpy."""
    from triton.runtime.errors import InterpreterError
    try:
        return fn(*args, **kwargs)
    except InterpreterError as error:  # Triton 3.6's interpreter does int() on a 1-element array
        if "0-dimensional" in str(error):
            pytest.skip(f"Triton's CPU interpreter fails on this numpy: {error}")
        raise


def honest_math(contract: CEContract) -> ChunkMath:
    return ChunkMath.of(contract)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("option", KERNEL_OPTIONS)
def test_kernel_chunk_equals_torch_chunk(kernel_device, option, dtype):
    hidden, weight, targets = make_inputs(dtype=dtype, ignore_every=OPTIONS[option].get("ignore_every", 0))
    hidden, weight, targets = hidden.to(kernel_device), weight.to(kernel_device), targets.to(kernel_device)
    m = honest_math(contract_for(option, "mean")[0])
    row_scale = torch.tensor(1 / 37, dtype=torch.float32, device=kernel_device)
    loss, grad = run_kernel(fused_kernel.kernel_chunk, hidden, weight, targets, row_scale, m, True)
    ref_loss, ref_grad = torch_chunk(hidden, weight, targets, row_scale, m, True)
    assert grad.dtype == dtype and grad.shape == (N, V)
    torch.testing.assert_close(loss, ref_loss.float(), rtol=1e-5, atol=1e-5)
    # The torch path rounds its fp32 gradient to the input dtype later; the kernel rounds it on store.
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(grad.float(), ref_grad.to(dtype).float(), rtol=0, atol=ulp * ref_grad.abs().max())


def test_kernel_without_gradients_leaves_the_logits(kernel_device):
    hidden, weight, targets = make_inputs(ignore_every=3)
    hidden, weight, targets = hidden.to(kernel_device), weight.to(kernel_device), targets.to(kernel_device)
    m = honest_math(CEContract(vocab_size=V, label_smoothing=0.1))
    row_scale = torch.tensor(1.0, device=kernel_device)
    loss, grad = run_kernel(fused_kernel.kernel_chunk, hidden, weight, targets, row_scale, m, False)
    assert grad is None
    torch.testing.assert_close(loss, torch_chunk(hidden, weight, targets, row_scale, m, False)[0])


@pytest.mark.parametrize("token_chunk", [5, 47, None])
@pytest.mark.parametrize("option", KERNEL_OPTIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_layer_on_the_kernel_path_matches_float64_pytorch(kernel_device, monkeypatch, reduction, option,
                                                          token_chunk):
    # Force the kernel path on the CPU interpreter too: the rule minus its CUDA check.
    monkeypatch.setattr(fused_kernel, "kernel_applies", lambda hidden, m: fused_kernel.kernel_covers(m, hidden.dtype))
    hidden, weight, targets = make_inputs(ignore_every=OPTIONS[option].get("ignore_every", 0))
    contract, kwargs = contract_for(option, reduction)
    moved = [t.to(kernel_device) for t in (hidden, weight, targets)]
    loss, dh, dw = run_kernel(run_fused, *moved, contract, token_chunk=token_chunk)
    ref_loss, ref_dh, ref_dw = oracle(hidden, weight, targets, reduction=reduction, **kwargs)
    assert_close_to(loss.cpu(), ref_loss, 1e-5)
    assert_close_to(dh.cpu(), ref_dh, 1e-5)
    assert_close_to(dw.cpu(), ref_dw, 1e-5)


@pytest.mark.parametrize("ignore_every", [1, 2])
def test_kernel_path_skips_ignored_tokens_exactly(kernel_device, monkeypatch, ignore_every):
    monkeypatch.setattr(fused_kernel, "kernel_applies", lambda hidden, m: fused_kernel.kernel_covers(m, hidden.dtype))
    hidden, weight, targets = make_inputs(ignore_every=ignore_every)
    hidden[::2] = float("nan")  # ignored rows add nothing, not even a NaN
    contract = CEContract(vocab_size=V, z_loss=1e-3)
    moved = [t.to(kernel_device) for t in (hidden, weight, targets)]
    loss, dh, dw = run_kernel(run_fused, *moved, contract, token_chunk=8)
    ignored = targets == -100
    assert not dh.cpu()[ignored].any()
    if ignore_every == 1:  # nothing visible: zeros, as the torch path gives
        assert loss.item() == 0.0 and not dw.any()
    else:
        ref_loss, ref_dh, ref_dw = oracle(hidden[~ignored], weight, targets[~ignored], reduction="mean", z_loss=1e-3)
        assert_close_to(loss.cpu(), ref_loss, 1e-5)
        assert_close_to(dh.cpu()[~ignored], ref_dh, 1e-5)
        assert_close_to(dw.cpu(), ref_dw, 1e-5)


def test_token_chunks_gather_visible_ids_only_when_asked():
    m = honest_math(CEContract(vocab_size=V))
    targets = torch.tensor([3, -100, 5, 6, -100, 7, 8])
    assert fused._token_chunks(targets, m, 3, skip_ignored=False) == [slice(0, 3), slice(3, 6), slice(6, 9)]
    chunks = fused._token_chunks(targets, m, 3, skip_ignored=True)
    assert [c.tolist() for c in chunks] == [[0, 2, 3], [5, 6]]
    assert fused._token_chunks(torch.tensor([1, 2]), m, 3, skip_ignored=True) == [slice(0, 3)]
    assert fused._token_chunks(torch.tensor([-100, -100]), m, 3, skip_ignored=True) == []


def test_kernel_covers_honest_mean_and_sum_only():
    covers = fused_kernel.kernel_covers
    assert covers(honest_math(CEContract(vocab_size=V)), torch.bfloat16)
    assert covers(honest_math(CEContract(vocab_size=V, reduction="sum", label_smoothing=0.1, z_loss=1e-3)),
                  torch.float32)
    assert covers(honest_math(CEContract(vocab_size=V, accum_dtype=torch.bfloat16)), torch.bfloat16)
    assert not covers(honest_math(CEContract(vocab_size=V, reduction="none")), torch.bfloat16)
    assert not covers(honest_math(CEContract(vocab_size=V, softcap=30.0)), torch.bfloat16)
    assert not covers(honest_math(CEContract(vocab_size=V, accum_dtype=torch.float64)), torch.float32)
    assert not covers(honest_math(CEContract(vocab_size=V, accum_dtype=torch.bfloat16)), torch.float32)
    assert not covers(honest_math(CEContract(vocab_size=V)), torch.float64)
    assert covers(honest_math(CEContract(vocab_size=V, layout="[S,B,V/TP]", vocab_end=62)), torch.bfloat16)
    for fault in LAYER_FAULTS:  # every fault keeps the torch math its signature was documented on
        assert not covers(faulty_chunk_math(CEContract(vocab_size=V), fault, 2), torch.bfloat16)


def test_kernel_is_never_chosen_for_cpu_tensors():
    m = honest_math(CEContract(vocab_size=V))
    assert not fused_kernel.kernel_applies(torch.zeros(2, 3, dtype=torch.bfloat16), m)


def _operand(device_is_cuda: bool, dtype: torch.dtype, columns: int) -> SimpleNamespace:
    """What ``reduction_blocks`` reads of a tensor, so that CPU machines test the CUDA rule."""
    return SimpleNamespace(is_cuda=device_is_cuda, dtype=dtype, shape=(8, columns))


@pytest.mark.parametrize("columns", [1, 4096, 4097, 100352, 151936])
def test_fp32_products_on_cuda_sum_their_reduction_in_blocks(columns):
    fp32 = _operand(True, torch.float32, 0)
    blocks = reduction_blocks(_operand(True, torch.float32, columns), fp32)
    covered = [i for b in blocks for i in range(columns)[b]]
    assert covered == list(range(columns))  # every column once, in order
    assert len(blocks) == -(-columns // FP32_REDUCTION_BLOCK)
    # Everything else (CPU, 16-bit operands into fp32 on tensor cores, a bf16 accumulator) is one product.
    for a, out in ((_operand(False, torch.float32, columns), fp32),
                   (_operand(True, torch.bfloat16, columns), fp32),
                   (_operand(True, torch.float32, columns), _operand(True, torch.bfloat16, 0))):
        assert reduction_blocks(a, out) == [slice(0, columns)]


@pytest.mark.parametrize("n_tokens, vocab, itemsize, expected", [
    (16384, 151936, 2, 4096),   # 1.25 GB of bf16 logits per chunk
    (16384, 32768, 2, 16384),   # the whole batch fits in one chunk
    (16384, 151936, 4, 2048),   # fp32 logits: half the tokens
    (47, 123, 4, 64),           # never more than the next power of two of the tokens
    (3, 10 ** 10, 2, 1),        # at least one token
])
def test_kernel_token_chunk(n_tokens, vocab, itemsize, expected):
    assert fused_kernel.kernel_token_chunk(n_tokens, vocab, itemsize) == expected


def test_unit_upstream_hands_over_the_saved_grads_and_other_upstreams_scale_them():
    hidden, weight, targets = make_inputs(ignore_every=3)
    head = FusedLinearCrossEntropy(hidden.shape[1], CEContract(vocab_size=V), weight=nn.Parameter(weight),
                                   token_chunk=9)
    h = hidden.clone().requires_grad_()
    loss = head(h, targets)
    first = torch.autograd.grad(loss, (h, head.weight), retain_graph=True)
    again = torch.autograd.grad(loss, (h, head.weight), retain_graph=True)
    tripled = torch.autograd.grad(loss, (h, head.weight), torch.tensor(3.0))
    for unit, same, three in zip(first, again, tripled):
        assert unit.data_ptr() == same.data_ptr()  # no second copy on the memory peak
        torch.testing.assert_close(three, 3 * unit, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_scale_cast_rounds_the_fp32_product_once_like_torch(kernel_device, dtype):
    source = torch.randn(3 * fused_kernel.SCALE_CAST_BLOCK + 5, generator=torch.Generator().manual_seed(0)) * 1e-3
    scale = torch.tensor(0.37)
    out = torch.empty_like(source, dtype=dtype, device=kernel_device)
    run_kernel(fused_kernel.scale_cast, source.to(kernel_device), scale.to(kernel_device), out)
    expected = torch.mul(source, scale, out=torch.empty_like(source, dtype=dtype))
    if dtype == torch.bfloat16 and kernel_device == "cpu":
        # Triton's CPU interpreter truncates to bf16 where the GPU rounds to nearest even (tests/test_gpu.py
        # holds the GPU to torch's bits): here, within one bf16 step.
        torch.testing.assert_close(out.float(), expected.float(), rtol=2 ** -7, atol=0)
    else:
        assert torch.equal(out.cpu(), expected)


def test_no_tokens_give_zero_grads_not_uninitialised_memory():
    head = FusedLinearCrossEntropy(D := 8, CEContract(vocab_size=V), weight=nn.Parameter(torch.randn(V, D)))
    h = torch.randn(0, D, requires_grad=True)
    loss = head(h, torch.zeros(0, dtype=torch.int64))
    dh, dw = torch.autograd.grad(loss, (h, head.weight))
    assert loss.item() == 0.0 and dh.shape == (0, D) and not dw.any()
