"""How products are computed where both sides need them: the reduction's split for fp32 on CUDA, and 16-bit
products on CPU.

cuBLAS's fp32 GEMM sums a long reduction in few long runs when the output has many rows. dL/dh of a
confident token is a small sum of small terms over the whole vocabulary, and on the example model's hidden
states (H200, V = 100352) one product over it was 35x less accurate than blocks of 4096 added in turn: 6e-5
against 1.7e-6 relative to float64 on the same logit gradient, for 0.8% more time in an fp32 fused step
(docs/benchmarks.md, "fp32 products on CUDA"). Both the fused layer and the reference sum this way.

A 16-bit product on CPU is the fp32 product of the same values, rounded once (``matmul``): what PyTorch's CPU
bf16/fp16 GEMM computes, up to the order of its fp32 sum, at fp32 speed (docs/benchmarks.md, "16-bit products
on CPU"). Neither rule can hide a path's fault: the blocks tile the reduction, each term once, and ``matmul``
multiplies exactly the operands it is handed and returns their dtype, so what a path multiplies, in which dtype
and where it rounds or accumulates stay that path's own (tests/test_walls.py holds both).
"""

from __future__ import annotations

import torch

FP32_REDUCTION_BLOCK = 4096
HALF_DTYPES = (torch.bfloat16, torch.float16)


def reduction_blocks(a: torch.Tensor, out: torch.Tensor) -> list[slice]:
    """Column blocks of ``a`` whose products ``a[:, block] @ b[block]`` are added into ``out`` one at a time:
    blocks of ``FP32_REDUCTION_BLOCK`` for fp32 on CUDA, elsewhere the whole reduction at once."""
    length = a.shape[1]
    if not (a.is_cuda and a.dtype == out.dtype == torch.float32) or length <= FP32_REDUCTION_BLOCK:
        return [slice(0, length)]
    return [slice(start, start + FP32_REDUCTION_BLOCK) for start in range(0, length, FP32_REDUCTION_BLOCK)]


def matmul(a: torch.Tensor, b: torch.Tensor, *, add: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` (``add + a @ b`` if given) in the operands' dtype, as that dtype's GEMM computes it; autograd-aware.

    On CPU, 16-bit operands are multiplied as the fp32 matmul of the same values and rounded to their dtype
    once: PyTorch's CPU bf16/fp16 GEMM also forms each product exactly in fp32, sums in fp32 and rounds the
    result (``add`` included) once, so the two differ only where their fp32 sums, taken in different orders,
    round to neighbouring 16-bit values (0.006-0.1% of elements at 2048 x 128 x 32768). Without 16-bit units
    (AVX2) that GEMM runs 4-60x slower than fp32's (dL/dh's (2048, 32768) @ (32768, 128): 15-18 s against 0.3 s),
    and its own summation order already changes with the operands' strides. The price is fp32 copies of the
    operands and the product for the call. On CUDA, and for other dtypes, this is ``a @ b`` (or
    ``torch.addmm``): the GEMM the native path runs on a GPU.

    Example:
        >>> z = matmul(hidden, weight.T)  # (N, V) logits in hidden's dtype
    """
    if a.is_cuda or a.dtype not in HALF_DTYPES or b.dtype != a.dtype:
        return a @ b if add is None else torch.addmm(add, a, b)
    # A 16-bit x 16-bit product is exact in fp32 (8 or 11 significant bits each, 24 in fp32).
    product = a.float() @ b.float() if add is None else torch.addmm(add.float(), a.float(), b.float())
    return product.to(a.dtype)
