"""ce_guard's own fused linear + cross-entropy output layer: chunked over tokens, vocab-parallel aware.

The ``[N, V]`` logits are never held. For ``mean`` and ``sum`` each chunk of tokens is projected,
reduced to its loss and to its gradients during forward, then dropped (Liger's design); backward only
scales them by the upstream gradient. For ``none`` the upstream gradient differs per token and is
unknown at forward time, so forward keeps the per-token log-sum-exp and backward recomputes each chunk.

Each chunk's softmax, loss and logit gradient are ``ce_guard.fused_chunk``'s plain-torch math or, on CUDA
for ``mean``/``sum`` without softcap or logit multiplier, ``ce_guard.fused_kernel``'s Triton kernels; there
chunks are larger, and ignored tokens are left out of the matmuls. This module holds the chunk loops, the
gradient accumulation and the autograd boundary.

Everything here is derived from the ``CEContract`` alone and shares no code with
``ce_guard.reference``: the guard compares two independent derivations of the same promises.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ce_guard import fused_kernel
from ce_guard._dist import all_gather_dim0, all_reduce, group_rank, group_size
from ce_guard._matmul import HALF_DTYPES, matmul, reduction_blocks
from ce_guard.contract import CEContract
from ce_guard.fused_chunk import ChunkMath, chunk_loss, logit_grad, mean_divisor, project, torch_chunk

__all__ = ["FusedLinearCrossEntropy", "fused_linear_cross_entropy", "make_output_weight"]


def _chunks(n_tokens: int, token_chunk: int) -> range:
    return range(0, n_tokens, token_chunk)


Rows = slice | torch.Tensor  # a chunk's tokens: a run of rows, or the (n,) ids of visible tokens


def _token_chunks(targets: torch.Tensor, m: ChunkMath, token_chunk: int, *, skip_ignored: bool) -> list[Rows]:
    """Each chunk's rows. With ``skip_ignored``, only visible tokens, gathered by id (one host sync).

    Ignored tokens add nothing to the loss, the count or the gradients, so their share of the three
    matmuls is wasted work (1/17 of the benchmark's tokens, far more in prompt-masked fine-tuning).
    """
    n_tokens = targets.numel()
    if skip_ignored:
        visible = (targets != m.ignore_index).nonzero().squeeze(1)  # (n_visible,); its size syncs the host
        if visible.numel() < n_tokens:
            return [ids for ids in visible.split(token_chunk) if ids.numel()]
    return [slice(start, start + token_chunk) for start in _chunks(n_tokens, token_chunk)]


class _FusedLinearCrossEntropyFn(torch.autograd.Function):
    """Autograd boundary: inputs as the caller holds them, gradients as the caller expects them.

    The hidden gradient is the full one (summed over the TP group's vocab slices); under the SP layout
    it is that sum restricted to this rank's rows of the gathered sequence.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, m: ChunkMath,
                token_chunk: int | None, grad_enabled: bool) -> torch.Tensor:
        ctx.math = m
        ctx.local_hidden_shape = hidden.shape
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        if m.sequence_parallel:
            hidden = all_gather_dim0(hidden, m.tp_group)  # (S, B, D) from (S/SP, B, D), rank order
            targets = all_gather_dim0(targets, m.tp_group)  # (S, B)
        loss_shape = targets.shape
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
        flat_targets = targets.reshape(-1)  # (N,)
        proj_weight = weight.to(hidden.dtype)  # (V/TP, D); matmuls in the input dtype
        n_tokens = flat_targets.numel()
        if token_chunk is None and fused_kernel.kernel_applies(flat_hidden, m):
            token_chunk = fused_kernel.kernel_token_chunk(n_tokens, m.vocab_slice_size, flat_hidden.element_size())
        ctx.token_chunk = token_chunk or _default_token_chunk(n_tokens, m.vocab_slice_size, hidden.shape[-1])
        # needs_input_grad ignores no_grad mode; without the check, eval would pay for gradients.
        ctx.needs_hidden_grad = grad_enabled and ctx.needs_input_grad[0]
        ctx.needs_weight_grad = grad_enabled and ctx.needs_input_grad[1]

        if m.reduction == "none":
            per_token, lse = _per_token_forward(flat_hidden, proj_weight, flat_targets, m, ctx.token_chunk)
            ctx.save_for_backward(flat_hidden, proj_weight, flat_targets, lse)
            return (per_token * m.rules.loss_scale).reshape(loss_shape)

        if m.reduction == "mean":
            row_scale = m.rules.loss_scale / mean_divisor(flat_targets, m)
        else:
            row_scale = torch.tensor(float(m.rules.loss_scale), dtype=torch.float64, device=flat_targets.device)
        loss, grad_hidden, grad_weight = _reduced_forward(
            flat_hidden, proj_weight, flat_targets, row_scale, m, ctx.token_chunk,
            want_hidden=ctx.needs_hidden_grad, want_weight=ctx.needs_weight_grad)
        # Saved (not kept as attributes) so a backward without retain_graph frees them as it returns.
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        m: ChunkMath = ctx.math
        if m.reduction == "none":
            flat_hidden, proj_weight, flat_targets, lse = ctx.saved_tensors
            row_weight = grad_loss.reshape(-1).to(m.accum_dtype) * m.rules.loss_scale  # (N,) upstream, per token
            row_weight = torch.where(flat_targets != m.ignore_index, row_weight, 0)
            grad_hidden, grad_weight = _chunked_grads(
                flat_hidden, proj_weight, flat_targets, lse, row_weight, m, ctx.token_chunk,
                want_hidden=ctx.needs_hidden_grad, want_weight=ctx.needs_weight_grad)
        else:
            saved_hidden, saved_weight = ctx.saved_tensors
            # Under TP the hidden gradient is all-reduced in place next: it must not alias the saved one.
            grad_hidden = _times_upstream(saved_hidden, grad_loss, may_alias=group_size(m.tp_group) == 1)
            grad_weight = _times_upstream(saved_weight, grad_loss, dtype=ctx.weight_dtype, may_alias=True)
        if grad_hidden is not None:
            grad_hidden = _full_hidden_grad(grad_hidden, ctx)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _times_upstream(saved: torch.Tensor | None, grad_loss: torch.Tensor, *, dtype: torch.dtype | None = None,
                    may_alias: bool) -> torch.Tensor | None:
    """A precomputed gradient times the upstream one, rounded once to ``dtype`` (default: ``saved``'s).

    When the upstream gradient is exactly 1 (a plain ``loss.backward()``) and no cast is needed, the
    saved tensor itself is handed over, as Liger does: a product would put a second weight-sized copy
    on the memory peak. The check costs one host sync per backward.
    """
    if saved is None:
        return None
    dtype = dtype or saved.dtype
    if may_alias and saved.dtype == dtype and bool(grad_loss == 1):
        return saved
    product = torch.empty_like(saved, dtype=dtype)
    if saved.is_cuda and saved.dtype == torch.float32 and saved.is_contiguous() and fused_kernel.triton_available():
        fused_kernel.scale_cast(saved, grad_loss, product)
    else:
        torch.mul(saved, grad_loss, out=product)
    return product


def _full_hidden_grad(partial: torch.Tensor, ctx) -> torch.Tensor:
    """Sum this slice's hidden gradient over TP; under SP keep this rank's rows of the gathered sequence."""
    m: ChunkMath = ctx.math
    full = all_reduce(partial, dist.ReduceOp.SUM, m.tp_group)  # (N, D) summed over vocab slices
    if m.sequence_parallel:
        local_rows = math.prod(ctx.local_hidden_shape[:-1])
        start = group_rank(m.tp_group) * local_rows
        full = full[start:start + local_rows]  # (S/SP * B, D)
    return full.to(ctx.hidden_dtype).reshape(ctx.local_hidden_shape)


def _gradient_buffers(hidden: torch.Tensor, weight: torch.Tensor, m: ChunkMath, chunks: list[Rows],
                      want_hidden: bool, want_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    # Partial hidden grads are summed over TP later, so across ranks they accumulate in accum_dtype (or wider).
    hidden_dtype = hidden.dtype if group_size(m.tp_group) == 1 else torch.promote_types(hidden.dtype, m.accum_dtype)
    # Zeros only where the chunks leave something unwritten: ignored rows that were skipped, or a dW
    # that no chunk overwrites (the first chunk's matmul ignores the old contents, beta=0).
    every_row = bool(chunks) and all(isinstance(rows, slice) for rows in chunks)
    new_hidden = torch.empty if every_row else torch.zeros
    new_weight = torch.empty if chunks else torch.zeros
    grad_hidden = new_hidden(hidden.shape, dtype=hidden_dtype, device=hidden.device) if want_hidden else None
    grad_weight = new_weight(weight.shape, dtype=m.accum_dtype, device=weight.device) if want_weight else None
    return grad_hidden, grad_weight


def _accumulate_grads(grad_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, rows: Rows,
                      grad_hidden: torch.Tensor | None, grad_weight: torch.Tensor | None, *, first: bool) -> None:
    """Add one chunk's share: its rows of dL/dh (written once) and its term of dL/dW (the first overwrites).

    ``hidden`` is the chunk's own (n, D) rows.
    """
    grad_logits = grad_logits.to(hidden.dtype)  # (n, V/TP) back to the input dtype for the matmuls
    if grad_hidden is not None:
        if isinstance(rows, slice):  # (n, D) straight into its rows, no temporary
            _matmul_into(grad_hidden[rows], grad_logits, weight, accumulate=False)
        else:  # (n, D) scattered to the visible tokens' rows
            product = torch.empty(grad_logits.shape[0], weight.shape[1], dtype=grad_hidden.dtype,
                                  device=grad_hidden.device)
            _matmul_into(product, grad_logits, weight, accumulate=False)
            grad_hidden.index_copy_(0, rows, product)
    if grad_weight is not None:  # (V/TP, D) += (V/TP, n) @ (n, D)
        _matmul_into(grad_weight, grad_logits.T, hidden, accumulate=not first)


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """``out (+)= a @ b`` without rounding the product to the operands' dtype first.

    Rounding every chunk's product to bf16 before an fp32 add would quietly reintroduce the bf16
    accumulation the contract rules out (for dW across chunks; for dL/dh across TP ranks, whose partial
    sums are added later); an ``accum_dtype`` of bf16 keeps it, by design (the matmul still sums each
    chunk's tokens in fp32 and rounds the running total once per chunk). A first write ignores ``out``'s
    old contents, so it needs no zeroed buffer. fp32 on CUDA sums in blocks, and 16-bit on CPU is fp32 products
    rounded once (``ce_guard._matmul``).
    """
    if not a.is_cuda and a.dtype == out.dtype and a.dtype in HALF_DTYPES:
        out.copy_(matmul(a, b, add=out if accumulate else None))  # an fp32 temporary, rounded once into out
        return
    # On CUDA, 16-bit tensor cores accumulate straight into an fp32 buffer (no product-sized temporary).
    mixed = a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and out.dtype == torch.float32
    if out.dtype != a.dtype and not mixed:
        a, b = a.to(out.dtype), b.to(out.dtype)  # elsewhere there is no mixed-dtype mm: the buffer's dtype
    out_dtype = {"out_dtype": torch.float32} if mixed else {}
    for i, block in enumerate(reduction_blocks(a, out)):
        if accumulate or i > 0:
            torch.addmm(out, a[:, block], b[block], out=out, **out_dtype)
        else:
            torch.mm(a[:, block], b[block], out=out, **out_dtype)


def _reduced_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                     m: ChunkMath, token_chunk: int, *, want_hidden: bool, want_weight: bool):
    """Loss of a ``mean``/``sum`` reduction, and its gradients for an upstream gradient of 1.

    ``row_scale`` (0-dim, float64) is each visible token's weight: the mean's 1/count, times the rules' loss scale.
    """
    want_grads = want_hidden or want_weight
    use_kernel = fused_kernel.kernel_applies(hidden, m)
    chunks = _token_chunks(targets, m, token_chunk, skip_ignored=use_kernel)
    grad_hidden, grad_weight = _gradient_buffers(hidden, weight, m, chunks, want_hidden, want_weight)
    # The kernel keeps its softmax and token weights in fp32 whatever the contract's floor; the torch
    # math holds them in accum_dtype, as the contract states.
    row_scale = row_scale.to(torch.float32 if use_kernel else m.accum_dtype)
    # The loss total is not one of the contract's accumulators; keep it at least fp32 so a bf16
    # accumulator contract shows up where docs/faults.md #3 says it does (dW worst, loss least).
    loss = torch.zeros((), dtype=m.loss_dtype, device=hidden.device)
    chunk_step = fused_kernel.kernel_chunk if use_kernel else torch_chunk
    for i, rows in enumerate(chunks):
        chunk_hidden = hidden[rows]  # (n, D): a view of a run of rows, or the visible rows gathered
        token_losses, grad = chunk_step(chunk_hidden, weight, targets[rows], row_scale, m, want_grads)
        loss += token_losses.sum() * row_scale
        if want_grads:
            _accumulate_grads(grad, chunk_hidden, weight, rows, grad_hidden, grad_weight, first=i == 0)
        del grad  # before the next chunk's logits exist: one (n, V/TP) buffer at a time
    return loss, grad_hidden, grad_weight


def _per_token_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, m: ChunkMath,
                       token_chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token losses and log-sum-exps (N,); no gradients, since the upstream ones are not known yet."""
    losses = torch.empty(targets.shape, dtype=m.loss_dtype, device=hidden.device)
    lses = torch.empty(targets.shape, dtype=m.accum_dtype, device=hidden.device)
    for start in _chunks(targets.numel(), token_chunk):
        sl = slice(start, start + token_chunk)
        logits, _ = project(hidden[sl], weight, m)
        chunk = chunk_loss(logits, targets[sl], m.rules.locate_targets(targets[sl], m), m)
        losses[sl], lses[sl] = chunk.loss, chunk.lse
        del logits, chunk  # one (n, V/TP) buffer at a time
    return losses, lses


def _chunked_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                   row_weight: torch.Tensor, m: ChunkMath, token_chunk: int, *, want_hidden: bool,
                   want_weight: bool):
    """Recompute each chunk's softmax from the saved lse (no collectives) and weight rows by upstream grads."""
    chunks = _token_chunks(targets, m, token_chunk, skip_ignored=False)
    grad_hidden, grad_weight = _gradient_buffers(hidden, weight, m, chunks, want_hidden, want_weight)
    for i, sl in enumerate(chunks):
        logits, tanh = project(hidden[sl], weight, m)  # (n, V/TP)
        probs = logits.sub_(lse[sl, None]).exp_()  # (n, V/TP)
        rows = m.rules.locate_targets(targets[sl], m)
        grad = logit_grad(probs, tanh, lse[sl], rows, row_weight[sl], m)  # (n, V/TP)
        _accumulate_grads(grad, hidden[sl], weight, sl, grad_hidden, grad_weight, first=i == 0)
        del logits, probs, grad  # one (n, V/TP) buffer at a time
    return grad_hidden, grad_weight


MIN_TOKEN_CHUNK = 256  # below this the chunk loop's per-chunk overhead dominates (2 tokens at D=128, V=100k)


def _default_token_chunk(n_tokens: int, vocab_slice: int, hidden_size: int) -> int:
    """Tokens per chunk so one chunk's logits are about as large as the hidden states (Liger's rule), at least
    ``MIN_TOKEN_CHUNK``."""
    chunk = max(math.ceil(max(n_tokens, 1) / math.ceil(vocab_slice / hidden_size)), MIN_TOKEN_CHUNK)
    return 1 << (chunk - 1).bit_length()


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                               contract: CEContract, token_chunk: int | None = None) -> torch.Tensor:
    """Functional form of :class:`FusedLinearCrossEntropy` (no shape validation; the module does that)."""
    return _FusedLinearCrossEntropyFn.apply(hidden, weight, targets, ChunkMath.of(contract), token_chunk,
                                            torch.is_grad_enabled())


def make_output_weight(hidden_size: int, rows: int, weight: nn.Parameter | None, *, owner: str,
                       device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Parameter:
    """The output projection ``(rows, hidden_size)``: a fresh one, or a borrowed one (tied embeddings)."""
    if not isinstance(hidden_size, int) or hidden_size <= 0:
        raise ValueError(f"{owner}: `hidden_size` must be a positive int, got {hidden_size!r}.")
    if weight is None:
        fresh = torch.empty(rows, hidden_size, device=device, dtype=dtype)
        return nn.Parameter(nn.init.normal_(fresh, std=hidden_size ** -0.5))
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"{owner}: `weight` must be an nn.Parameter to borrow (e.g. the tied embedding's"
                         f" `.weight`), got {type(weight).__name__}. Wrap it with nn.Parameter or pass None.")
    if tuple(weight.shape) != (rows, hidden_size):
        raise ValueError(f"{owner}: `weight` must have shape (vocab_end - vocab_start, hidden_size) ="
                         f" ({rows}, {hidden_size}), found {tuple(weight.shape)}. Pass this rank's vocab slice"
                         " of the output weight, or fix the contract's vocab_start/vocab_end.")
    return weight


class FusedLinearCrossEntropy(nn.Module):
    """Output projection + cross-entropy that never materialises ``[N, V]`` logits, honouring a ``CEContract``.

    Args:
        hidden_size: D, the last dim of ``hidden``.
        contract: the promises this layer keeps; exposed as ``ce_contract`` for the parity callback.
        weight: an existing ``nn.Parameter`` of shape ``(vocab_end - vocab_start, hidden_size)`` to
            borrow (tied embeddings); ``None`` creates one.
        token_chunk: tokens per chunk; ``None`` picks about ``N * D / (V/TP)`` so a logits chunk is
            about the size of the hidden states, or on the CUDA kernel path the largest power of two
            whose logits fit ~1.25 GB (4096 tokens at V=152k in bf16). Memory beyond the gradients is
            about one logits chunk, plus the fp32 dW accumulator unless the contract's
            ``accum_dtype`` is the weight's dtype: ``accum_dtype=torch.bfloat16, token_chunk=512``
            is the low-memory setting (~0.16 GB at V=152k, D=4096; dW rounded once per chunk).
        device, dtype: of a freshly created weight.

    Raises:
        ValueError: on a weight of the wrong shape or type, a bad ``token_chunk``, a vocab slice that
            is not the whole vocabulary with no TP group to reduce over, or a contract whose mean divides by
            a given count or whose z-loss covers all positions (this layer implements neither).

    Example:
        >>> head = FusedLinearCrossEntropy(64, CEContract(vocab_size=1000, label_smoothing=0.1))
        >>> loss = head(torch.randn(4, 16, 64), torch.randint(0, 1000, (4, 16)))
    """

    def __init__(self, hidden_size: int, contract: CEContract, *, weight: nn.Parameter | None = None,
                 token_chunk: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        if not isinstance(contract, CEContract):
            raise ValueError(f"{owner}: `contract` must be a CEContract, got {type(contract).__name__}.")
        if token_chunk is not None and (not isinstance(token_chunk, int) or token_chunk <= 0):
            raise ValueError(f"{owner}: `token_chunk` must be None or a positive int, got {token_chunk!r}.")
        if not contract.is_full_vocab and contract.layout != "[N,V]" and group_size(contract.tp_group) == 1:
            raise ValueError(f"{owner}: the contract's vocab slice [{contract.vocab_start}, {contract.vocab_end})"
                             f" is not the whole vocabulary ({contract.vocab_size}) but `tp_group` has one rank,"
                             " so the other slices' logits would never be reduced. Pass the TP process group.")
        self.hidden_size = hidden_size
        self.ce_contract = contract
        self.token_chunk = token_chunk
        self.weight = make_output_weight(hidden_size, contract.vocab_slice_size, weight, owner=owner,
                                         device=device, dtype=dtype)
        self._math = ChunkMath.of(contract)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of ``hidden`` ``[..., D]`` against ``targets`` ``[...]`` (int64), in fp32 or ``accum_dtype`` if wider.

        Scalar for ``mean``/``sum``; ``targets``' shape for ``none`` (the gathered sequence under SP).
        """
        owner = type(self).__name__
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"{owner}: `hidden` last dim must be hidden_size={self.hidden_size},"
                             f" found shape {tuple(hidden.shape)}.")
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(f"{owner}: `targets` shape must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])},"
                             f" found {tuple(targets.shape)}.")
        if targets.dtype != torch.int64:
            raise ValueError(f"{owner}: `targets` must be int64 class ids, found {targets.dtype}."
                             " Cast with targets.long().")
        return _FusedLinearCrossEntropyFn.apply(hidden, self.weight, targets, self._math, self.token_chunk,
                                                torch.is_grad_enabled())

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, {self.ce_contract}, token_chunk={self.token_chunk}"
