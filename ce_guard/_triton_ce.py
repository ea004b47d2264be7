"""Triton kernels of the fused layer's CUDA fast path: softmax statistics, loss and logit gradient per chunk,
and the hand-over of the fp32 weight gradient in the weight's dtype.

The chunk kernels run one program per token row, hold their statistics in fp32 and read the logits in
``BLOCK``-wide strips; the gradient is written over the logits in their own dtype.

    loss = (1-eps)(lse - z_y) + eps(lse - mean_v z_v) + z_loss lse^2, 0 on ignored tokens
    dLoss/dz_v = w (p_v (1 + 2 z_loss lse) - (1-eps)[v = y] - eps/V), w = row_scale (0 if ignored)

Imported only when a chunk runs on CUDA (``ce_guard.fused_kernel.triton_kernels``): ce_guard imports without Triton.
"""

import triton
import triton.language as tl


@triton.jit
def statistics(row_ptr, n_cols, BLOCK: tl.constexpr):
    """Running max, the denominator against it (online softmax) and the logit sum of one row."""
    cols = tl.arange(0, BLOCK)
    run_max = float("-inf")
    denominator = 0.0
    logit_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        in_row = start + cols < n_cols
        z = tl.load(row_ptr + start + cols, mask=in_row, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        denominator = denominator * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        run_max = new_max
        logit_sum += tl.sum(tl.where(in_row, z, 0.0), axis=0)
    return run_max, denominator, logit_sum


@triton.jit
def write_grad(row_ptr, n_cols, target_col, lse, row_weight, vocab_size, label_smoothing, z_loss,
               BLOCK: tl.constexpr):
    """dLoss/dz over one row in place; ``target_col`` is -1 where the target is not in this row."""
    cols = tl.arange(0, BLOCK)
    prob_scale = row_weight * (1 + 2 * z_loss * lse)
    uniform = label_smoothing / vocab_size * row_weight
    hit = (1 - label_smoothing) * row_weight
    for start in range(0, n_cols, BLOCK):
        in_row = start + cols < n_cols
        z = tl.load(row_ptr + start + cols, mask=in_row, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) * prob_scale - uniform
        grad = tl.where(start + cols == target_col, grad - hit, grad)
        tl.store(row_ptr + start + cols, grad.to(row_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def whole_row(logits_ptr, row_stride, targets_ptr, row_scale_ptr, loss_ptr, n_cols, ignore_index,
              label_smoothing, z_loss, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """The whole vocabulary in one row: statistics, loss and (with ``WRITE_GRAD``) the gradient."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)
    visible = target != ignore_index
    run_max, denominator, logit_sum = statistics(row_ptr, n_cols, BLOCK)
    lse = run_max + tl.log(denominator)
    owned = visible & (target >= 0) & (target < n_cols)  # never read outside the row
    target_logit = tl.load(row_ptr + target, mask=owned, other=0.0).to(tl.float32)
    loss = lse - (1 - label_smoothing) * target_logit - label_smoothing * (logit_sum / n_cols)
    loss += z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(visible, loss, 0.0))
    if WRITE_GRAD:
        row_weight = tl.where(visible, tl.load(row_scale_ptr), 0.0)
        write_grad(row_ptr, n_cols, tl.where(owned, target, -1), lse, row_weight, n_cols, label_smoothing,
                   z_loss, BLOCK)


@triton.jit
def slice_statistics(logits_ptr, row_stride, targets_ptr, stats_ptr, n_rows, n_cols, vocab_start,
                     ignore_index, BLOCK: tl.constexpr):
    """A vocab slice's max, denominator, target logit (0 unless owned) and logit sum, for the TP reduction."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)
    local = target - vocab_start
    owned = (target != ignore_index) & (local >= 0) & (local < n_cols)
    run_max, denominator, logit_sum = statistics(row_ptr, n_cols, BLOCK)
    tl.store(stats_ptr + row, run_max)
    tl.store(stats_ptr + n_rows + row, denominator)
    tl.store(stats_ptr + 2 * n_rows + row, tl.load(row_ptr + local, mask=owned, other=0.0).to(tl.float32))
    tl.store(stats_ptr + 3 * n_rows + row, logit_sum)


@triton.jit
def slice_grad(logits_ptr, row_stride, targets_ptr, lse_ptr, row_scale_ptr, n_cols, vocab_start, vocab_size,
               ignore_index, label_smoothing, z_loss, BLOCK: tl.constexpr):
    """A vocab slice's gradient from the TP-reduced log-sum-exp."""
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    visible = target != ignore_index
    local = target - vocab_start
    owned = visible & (local >= 0) & (local < n_cols)
    row_weight = tl.where(visible, tl.load(row_scale_ptr), 0.0)
    write_grad(logits_ptr + row * row_stride, n_cols, tl.where(owned, local, -1), tl.load(lse_ptr + row),
               row_weight, vocab_size, label_smoothing, z_loss, BLOCK)


@triton.jit
def scale_cast(source_ptr, scale_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    """``out = source * scale`` in fp32, rounded once (to nearest even) to ``out``'s dtype."""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < n_elements
    product = tl.load(source_ptr + offsets, mask=in_range) * tl.load(scale_ptr)
    tl.store(out_ptr + offsets, product.to(out_ptr.dtype.element_ty), mask=in_range)
