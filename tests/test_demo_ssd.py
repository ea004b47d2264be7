"""The chunked SSD scan against the per-step recurrence: exact in float64, within rounding in fp32/bf16."""

from __future__ import annotations

import pytest
import torch

from ce_guard.demos.ssd import ssd_chunked, ssd_sequential_reference


def _inputs(dtype: torch.dtype, *, batch=2, seq=37, heads=6, head_dim=5, groups=3, state=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, heads, head_dim, generator=g, dtype=torch.float64)
    dt = torch.rand(batch, seq, heads, generator=g, dtype=torch.float64) * 0.2 + 1e-3
    A = -torch.rand(heads, generator=g, dtype=torch.float64) * 8 - 0.5
    Bm = torch.randn(batch, seq, groups, state, generator=g, dtype=torch.float64)
    Cm = torch.randn(batch, seq, groups, state, generator=g, dtype=torch.float64)
    h0 = torch.randn(batch, heads, head_dim, state, generator=g, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (x, dt, A, Bm, Cm, h0))


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 16, 37, 64])  # 37 is prime: one ragged tail everywhere
@pytest.mark.parametrize("with_initial_state", [False, True])
def test_chunked_equals_sequential_float64(chunk_size: int, with_initial_state: bool) -> None:
    x, dt, A, Bm, Cm, h0 = _inputs(torch.float64)
    h0 = h0 if with_initial_state else None
    y_ref, state_ref = ssd_sequential_reference(x, dt, A, Bm, Cm, initial_state=h0)
    y, state = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=chunk_size, initial_state=h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, state_ref, rtol=1e-12, atol=1e-12)


def test_gradients_match_sequential_float64() -> None:
    inputs = [t.requires_grad_() for t in _inputs(torch.float64, seq=19)]
    y, state = ssd_chunked(*inputs[:5], chunk_size=8, initial_state=inputs[5])
    grads = torch.autograd.grad((y.square().sum() + state.sum()), inputs)
    y_ref, state_ref = ssd_sequential_reference(*inputs[:5], initial_state=inputs[5])
    grads_ref = torch.autograd.grad((y_ref.square().sum() + state_ref.sum()), inputs)
    for name, g, g_ref in zip(("x", "dt", "A", "B", "C", "h0"), grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10,
                                   msg=lambda m, name=name: f"d/d{name}: {m}")


# Error of a low-precision input against the float64 scan of the *same rounded inputs*, relative to the
# output's scale: the scan itself runs in fp32, so bf16 costs only the final rounding of y (at most
# 2^-8 relative; a bf16 scan would be off by more). fp32 sits at ~1e-7.
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
def test_low_precision_inputs_scan_in_fp32(dtype: torch.dtype, tol: float) -> None:
    x, dt, A, Bm, Cm, _ = _inputs(dtype, seq=70)
    y, state = ssd_chunked(x, dt, A, Bm, Cm, chunk_size=16)
    y_ref, state_ref = ssd_sequential_reference(*(t.double() for t in (x, dt, A, Bm, Cm)))
    assert y.dtype == dtype and state.dtype == torch.float32
    scale = y_ref.abs().max()
    assert (y.double() - y_ref).abs().max() / scale < tol
    assert (state.double() - state_ref).abs().max() / state_ref.abs().max() < 1e-6


def test_rejects_mismatched_shapes() -> None:
    x, dt, A, Bm, Cm, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="dt of shape"):
        ssd_chunked(x, dt[:, :-1], A, Bm, Cm, chunk_size=8)
    with pytest.raises(ValueError, match="G dividing H"):
        four = torch.cat([Bm, Bm[:, :, :1]], dim=2)  # 4 groups cannot share 6 heads
        ssd_chunked(x, dt, A, four, four, chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_chunked(x, dt, A, Bm, Cm, chunk_size=0)
