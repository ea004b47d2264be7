"""The hybrid's Mamba-2 mixer on CUDA through flash-linear-attention's Triton kernels (the ``gpu`` extra).

Mamba-2's SSD scan is gated linear attention with one scalar decay per head:

    state_t = exp(dt_t * A) * state_{t-1} + (dt_t * x_t) B_t^T,    y_t = state_t C_t

is fla's ``chunk_gla`` with q = C, k = B, v = x * dt, scale 1 and the log-decay g = A * dt on every key
channel. (``chunk_simple_gla`` takes the scalar decay directly, but fla 0.6 refuses its backward on Hopper
with Triton 3.4 to 3.7.0, the Triton that torch 2.11 ships: that kernel computes wrong gradients there.)
The short causal conv with its SiLU is fla's ``causal_conv1d``. ``ssd.py``'s plain-PyTorch scan stays the
CPU path and the oracle that ``tests/test_gpu.py`` holds these kernels to. fla is imported only when a CUDA
forward uses it.
"""

from __future__ import annotations

import importlib.util

import torch

KERNELS = ("auto", "torch", "fla")


def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def installed_kernels(kernels: str) -> str:
    """``kernels`` as this environment can honour it, resolved once when a mixer is built (not in a forward
    that ``torch.compile`` traces): ``auto`` without fla is ``torch``; ``fla`` without it is an error."""
    if fla_installed():
        return kernels
    if kernels == "fla":
        raise ImportError("kernels='fla' needs flash-linear-attention's kernels: pip install 'ce_guard[gpu]' "
                          "(or use kernels='auto', which falls back to plain PyTorch without them).")
    return "torch"


def uses_fla(kernels: str, device: torch.device) -> bool:
    """Whether a mixer with resolved ``kernels`` runs fla's kernels on ``device``.

    ``auto`` takes them on CUDA; ``torch`` never; ``fla`` always, and refuses a device its Triton kernels
    cannot run on rather than quietly training on the slow path.
    """
    if kernels == "torch":
        return False
    if kernels == "fla" and device.type != "cuda":
        raise ValueError(f"Expected a CUDA device for kernels='fla' (flash-linear-attention's Triton kernels), "
                         f"got {device.type!r}; use kernels='auto' to fall back to plain PyTorch there.")
    return device.type == "cuda"


def ssd_fla(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
            Cm: torch.Tensor) -> torch.Tensor:
    """The SSD scan of :func:`~ce_guard.demos.ssd.ssd_chunked` (same arguments, zero initial state): y (B, L, H, P).

    q, k and v go in x's dtype (bf16 under autocast: the kernel's matmuls run on tensor cores), the log-decay
    in fp32; the kernel accumulates its state in fp32.
    """
    from fla.ops.gla import chunk_gla

    heads_per_group = x.shape[2] // Bm.shape[2]
    q = Cm.repeat_interleave(heads_per_group, dim=2).to(x.dtype)  # (B, L, H, N): head h reads group h // r
    k = Bm.repeat_interleave(heads_per_group, dim=2).to(x.dtype)
    v = (x * dt.unsqueeze(-1)).to(x.dtype)  # (B, L, H, P) discretised input
    g = (dt * A).float().unsqueeze(-1).expand(k.shape)  # (B, L, H, N): the head's log-decay on every channel
    y, _ = chunk_gla(q, k, v, g, scale=1.0)
    return y


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``silu(CausalDepthwiseConv(x))`` in one kernel: x (B, L, C), weight (C, width), bias (C,)."""
    from fla.modules.causal_conv1d import causal_conv1d

    y, _ = causal_conv1d(x, weight, bias, activation="silu")
    return y
