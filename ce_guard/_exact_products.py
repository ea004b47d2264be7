"""The reference's exact products: fp32 accumulation from input-dtype operands, and the power-of-two scales
that carry 16-bit operands into fp16 without rounding (see ce_guard/reference.py's module docstring)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ce_guard._matmul import reduction_blocks

FP16_EXPONENT = 14  # scaled fp16 operands stay under 2**14: headroom below fp16's 65504, 28 binades above its normals' floor


def exact_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated in fp32, from operands in the input dtype.

    16-bit operands on CUDA run on tensor cores with an fp32 output: a bf16 or fp16 product is exact in fp32,
    so this equals the fp32 matmul of the upcast operands up to summation order, at tensor-core speed.
    """
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> None:
    """``out += alpha * a @ b`` into fp32 ``out``: fp16 operands on CUDA on tensor cores (exact products);
    fp32 on CUDA in blocks of the reduction (``ce_guard._matmul``)."""
    if a.is_cuda and a.dtype == torch.float16:
        torch.addmm(out, a, b, alpha=alpha, out_dtype=torch.float32, out=out)
        return
    a, b = a.float(), b.float()  # fp16 x fp16 is exact in fp32, so upcasting first gives the same products
    for block in reduction_blocks(a, out):
        out.addmm_(a[:, block], b[block], alpha=alpha)


def default_backward_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float16 if weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) else torch.float32


def ceil_log2(x: torch.Tensor) -> torch.Tensor:
    """e with ``x <= 2**e`` (int32; 0 for 0), from the exponent bits."""
    return torch.frexp(x.float()).exponent.clamp(-100, 100)


def pow2(exponent: torch.Tensor | int) -> torch.Tensor:
    """``2**exponent`` in fp32, built from its bits, so it is exact."""
    exponent = torch.as_tensor(exponent, dtype=torch.int32)
    return ((exponent.clamp(-126, 127) + 127) << 23).view(torch.float32)


def abs_max(t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    low, high = torch.aminmax(t, dim=dim)  # no |t|-sized temporary
    return torch.maximum(-low, high).float()


@contextmanager
def exact_fp32_matmul() -> Iterator[None]:
    """A user's ``set_float32_matmul_precision('high')`` would let TF32 into the reference: undo it here."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
