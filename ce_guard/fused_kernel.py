"""The fused layer's CUDA fast path: each chunk's softmax, loss and logit gradient as Triton kernels.

For ``mean``/``sum`` without softcap or logit multiplier, the kernels of ``ce_guard._triton_ce`` overwrite
a chunk's logits with dLoss/dz in place (two reads and one write of the chunk instead of a dozen elementwise
kernels and an fp32 copy): one kernel on a whole vocabulary, a statistics kernel, the TP all-reduces and a gradient
kernel on a vocab slice. They compute the honest decisions of :class:`ce_guard.fused_chunk.ChunkRules`;
rules that change any of them keep the plain-torch chunk math. Timings: docs/benchmarks.md, "Output
layer" and "TP".
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ce_guard._dist import all_reduce, group_size
from ce_guard.fused_chunk import ChunkMath, token_loss

KERNEL_LOGITS_BYTES = 1_250_000_000  # one chunk's logits: ~4096 tokens at V=152k in bf16 (see docs/benchmarks.md)
KERNEL_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SCALE_CAST_BLOCK = 8192


def kernel_applies(hidden: torch.Tensor, m: ChunkMath) -> bool:
    """Whether this forward's chunks run :func:`kernel_chunk`: CUDA tensors, Triton, and math it covers."""
    return hidden.is_cuda and kernel_covers(m, hidden.dtype) and triton_available()


def kernel_covers(m: ChunkMath, input_dtype: torch.dtype) -> bool:
    """``mean``/``sum`` without softcap or logit multiplier under the honest rules, dW accumulated in fp32 or in
    the input dtype."""
    return (m.reduction != "none" and m.rules.kernel_allowed and m.softcap is None and m.logit_multiplier == 1
            and input_dtype in KERNEL_INPUT_DTYPES and m.accum_dtype in (torch.float32, input_dtype))


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_token_chunk(n_tokens: int, vocab_slice: int, itemsize: int) -> int:
    """The largest power-of-two chunk whose logits fit ``KERNEL_LOGITS_BYTES``, at most all tokens.

    Larger than Liger's rule: fewer, fuller matmuls and fewer passes over the dW accumulator, which
    at V x D = 152k x 4096 is itself 1.2 GB (bf16) or 2.5 GB (fp32) of traffic per chunk.
    """
    fit = max(1, KERNEL_LOGITS_BYTES // (vocab_slice * itemsize))
    return min(1 << (fit.bit_length() - 1), 1 << (max(n_tokens, 1) - 1).bit_length())


def kernel_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                 m: ChunkMath, want_grads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``fused_chunk.torch_chunk``'s results from one matmul and Triton kernels, the logit gradient over the logits.

    On one rank's whole vocabulary a single kernel does it all. On a vocab slice the softmax statistics
    must be reduced over TP between the two passes, so a statistics kernel runs, then the all-reduces
    (``fused_chunk.chunk_loss``'s, on ``(n,)`` vectors), then a gradient kernel.
    """
    logits = hidden @ weight.T  # (n, V/TP) in the input dtype, as the torch path's matmul
    n_rows, n_cols = logits.shape
    block = min(4096, 1 << (n_cols - 1).bit_length())
    launch = dict(BLOCK=block, num_warps=8 if block >= 2048 else 4)
    kernels = triton_kernels()
    if group_size(m.tp_group) == 1:
        losses = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)  # (n,)
        kernels.whole_row[(n_rows,)](logits, logits.stride(0), targets, row_scale, losses, n_cols, m.ignore_index,
                                     float(m.label_smoothing), float(m.z_loss), WRITE_GRAD=want_grads, **launch)
        return losses, logits if want_grads else None

    stats = torch.empty(4, n_rows, dtype=torch.float32, device=hidden.device)  # max, denominator, z_y, sum_v z_v
    kernels.slice_statistics[(n_rows,)](logits, logits.stride(0), targets, stats, n_rows, n_cols, m.vocab_start,
                                         m.ignore_index, **launch)
    row_max, local_denominator, target_logit, logit_sum = stats.unbind(0)  # this slice's (n,) each
    global_max = all_reduce(row_max.clone(), dist.ReduceOp.MAX, m.tp_group)
    sums = torch.stack([local_denominator * torch.exp(row_max - global_max), target_logit, logit_sum])
    denominator, target_logit, logit_sum = all_reduce(sums, dist.ReduceOp.SUM, m.tp_group).unbind(0)
    lse = global_max + denominator.log()  # (n,) over the global vocab
    losses = token_loss(lse, target_logit, logit_sum / m.vocab_size, targets, m)
    if not want_grads:
        return losses, None
    kernels.slice_grad[(n_rows,)](logits, logits.stride(0), targets, lse, row_scale, n_cols, m.vocab_start,
                                  m.vocab_size, m.ignore_index, float(m.label_smoothing), float(m.z_loss), **launch)
    return losses, logits


def scale_cast(source: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out = source * scale`` in fp32, rounded once to ``out``'s dtype, in one vectorised pass.

    torch's ``mul(out=)`` into a narrower dtype runs a non-vectorised kernel, in two launches once the
    source passes 2^31 bytes: 2.9 ms for the fp32 dW at V x D = 152k x 4096 on an H200, 3% of the layer.
    """
    n_elements = source.numel()
    triton_kernels().scale_cast[(-(-n_elements // SCALE_CAST_BLOCK),)](
        source, scale.to(torch.float32), out, n_elements, BLOCK=SCALE_CAST_BLOCK, num_warps=8)


def triton_kernels():
    """Import-on-first-use, so that importing ce_guard needs no Triton (CPU machines, CI)."""
    from ce_guard import _triton_ce

    return _triton_ce
