"""How a gradient product's reduction is split: fp32 on CUDA sums in blocks of ``FP32_REDUCTION_BLOCK``.

cuBLAS's fp32 GEMM sums a long reduction in few long runs when the output has many rows. dL/dh of a
confident token is a small sum of small terms over the whole vocabulary, and on the example model's hidden
states (H200, V = 100352) one product over it was 35x less accurate than blocks of 4096 added in turn: 6e-5
against 1.7e-6 relative to float64 on the same logit gradient, for 0.8% more time in an fp32 fused step
(docs/benchmarks.md, "fp32 products on CUDA"). Both the fused layer and the reference sum this way.
"""

from __future__ import annotations

import torch

FP32_REDUCTION_BLOCK = 4096


def reduction_blocks(a: torch.Tensor, out: torch.Tensor) -> list[slice]:
    """Column blocks of ``a`` whose products ``a[:, block] @ b[block]`` are added into ``out`` one at a time:
    blocks of ``FP32_REDUCTION_BLOCK`` for fp32 on CUDA, elsewhere the whole reduction at once."""
    length = a.shape[1]
    if not (a.is_cuda and a.dtype == out.dtype == torch.float32) or length <= FP32_REDUCTION_BLOCK:
        return [slice(0, length)]
    return [slice(start, start + FP32_REDUCTION_BLOCK) for start in range(0, length, FP32_REDUCTION_BLOCK)]
