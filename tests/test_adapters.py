"""Peer adapters: honest contracts, correct numbers where the peer runs here, clear errors where it cannot.

Liger and Cut CE need CUDA/Triton and are not installed in CI, so only their missing-package errors
are tested here; the benchmark exercises them on a GPU.
"""

from __future__ import annotations

import io
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from dist_helpers import run_distributed
from torch import nn

from ce_guard.adapters import (
    CutCrossEntropy,
    LigerFusedLinearCrossEntropy,
    LossParallelCrossEntropy,
    TorchLinearCrossEntropy,
)

IGNORE = -100
N, D, V = 47, 31, 123


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g) * 2
    weight = torch.randn(V, D, generator=g) / math.sqrt(D)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = IGNORE
    return hidden, weight, targets


def _oracle(hidden, weight, targets, reduction, upstream, label_smoothing=0.0):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    loss = F.cross_entropy(h @ w.T, targets, reduction=reduction, ignore_index=IGNORE, label_smoothing=label_smoothing)
    dh, dw = torch.autograd.grad(loss, (h, w), upstream.double())
    return loss.detach(), dh, dw


def _assert_close(actual, expected, rtol=1e-5):
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


# label smoothing leaves torch's chunked path for its materialised reference path (it warns): test both.
@pytest.mark.filterwarnings("ignore:linear_cross_entropy. ``options`` ignored")
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_linear_cross_entropy_matches_float64(reduction, label_smoothing):
    hidden, weight, targets = _inputs()
    head = TorchLinearCrossEntropy(D, V, weight=nn.Parameter(weight.clone()), reduction=reduction,
                                   label_smoothing=label_smoothing)
    assert head.ce_contract.accum_dtype == torch.float32
    assert head.ce_contract.label_smoothing == label_smoothing
    h = hidden.clone().requires_grad_()
    loss = head(h.reshape(1, N, D), targets.reshape(1, N))
    upstream = torch.linspace(-1, 2, N).reshape(1, N) if reduction == "none" else torch.ones(())
    dh, dw = torch.autograd.grad(loss, (h, head.weight), upstream)
    ref_loss, ref_dh, ref_dw = _oracle(hidden, weight, targets, reduction, upstream.reshape(-1) if
                                       reduction == "none" else upstream, label_smoothing=label_smoothing)
    _assert_close(loss.reshape(ref_loss.shape), ref_loss)
    _assert_close(dh, ref_dh)
    _assert_close(dw, ref_dw)


def test_torch_linear_cross_entropy_needs_torch_2_13(monkeypatch):
    monkeypatch.delattr(F, "linear_cross_entropy")
    with pytest.raises(ImportError, match=r"torch >= 2\.13.*found torch"):
        TorchLinearCrossEntropy(D, V)


@pytest.mark.parametrize(("adapter", "module", "extra"), [
    (LigerFusedLinearCrossEntropy, "liger_kernel", "liger"),
    (CutCrossEntropy, "cut_cross_entropy", "cce"),
])
def test_missing_peer_names_the_pip_extra(monkeypatch, adapter, module, extra):
    # A None entry in sys.modules makes the import fail whether or not the package is installed.
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"pip install 'ce_guard\[{extra}\]'"):
        adapter(D, V)


def test_library_imports_without_peers():
    assert "liger_kernel" not in sys.modules and "cut_cross_entropy" not in sys.modules


def _loss_parallel_child(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    hidden, weight, targets = _inputs(seed=1)
    targets[:3] = torch.tensor([61, 62, 63])  # around the chunk boundary 62 of V=123 over 2 ranks
    out = {}
    for reduction in ("mean", "sum", "none"):
        head = LossParallelCrossEntropy(D, V, mesh, reduction=reduction)
        start, end = head.ce_contract.vocab_start, head.ce_contract.vocab_end
        with torch.no_grad():
            head.weight.copy_(weight[start:end])
        h = hidden.clone().requires_grad_()
        loss = head(h, targets)
        upstream = torch.linspace(-1, 2, N) if reduction == "none" else torch.ones(())
        dh, dw = torch.autograd.grad(loss, (h, head.weight), upstream)
        ref_loss, ref_dh, ref_dw = _oracle(hidden, weight, targets, reduction, upstream)
        out[reduction] = ((loss.detach(), dh, dw), (ref_loss, ref_dh, ref_dw[start:end]), (start, end))
    buffer = io.BytesIO()
    torch.save(out, buffer)  # bytes: queued tensors would go by shared memory that dies with the child
    return buffer.getvalue()


@pytest.mark.distributed
def test_loss_parallel_on_a_two_rank_gloo_mesh():
    """Verified on torch 2.13 CPU/gloo: DTensor loss_parallel runs; its backward needs the context too."""
    ranks = [torch.load(io.BytesIO(blob)) for blob in run_distributed(_loss_parallel_child, 2)]
    assert [r["mean"][2] for r in ranks] == [(0, 62), (62, 123)]
    for result in ranks:
        for reduction, (actual, expected, _) in result.items():
            for a, e in zip(actual, expected):
                _assert_close(a, e)
