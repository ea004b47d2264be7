"""Peers' fused output layers behind ce_guard's interface, each declaring the contract it really keeps.

Every adapter is an ``nn.Module`` with ``forward(hidden, targets) -> loss`` and a ``ce_contract``, so the
parity callback can shadow it exactly as it shadows :class:`ce_guard.fused.FusedLinearCrossEntropy`.
Peer packages are imported lazily: ce_guard imports without them, and constructing an adapter whose
package is missing says which pip extra to install.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ce_guard._dist import all_reduce
from ce_guard.contract import CEContract, Reduction
from ce_guard.fused import make_output_weight

__all__ = ["CutCrossEntropy", "LigerFusedLinearCrossEntropy", "LossParallelCrossEntropy",
           "TorchLinearCrossEntropy"]


def _require(module: str, *, extra: str, owner: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{owner} needs the `{module}` package, which is not importable ({error})."
                          f" Install it with: pip install 'ce_guard[{extra}]'") from error


def _flatten(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (N, D), (N,)


def _unflatten(loss: torch.Tensor, targets: torch.Tensor, reduction: str) -> torch.Tensor:
    return loss.reshape(targets.shape) if reduction == "none" else loss


class LigerFusedLinearCrossEntropy(nn.Module):
    """Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (called as ``loss(W, h, y)``).

    Liger keeps the max and denominator in fp32 but accumulates the weight gradient in the weight's
    dtype unless ``accum_dtype=torch.float32``; the contract declares that weaker dtype. Its ``mean``
    divides by this rank's non-ignored tokens; there is no cross-rank count.
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, weight: nn.Parameter | None = None,
                 reduction: Reduction = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                 z_loss: float = 0.0, softcap: float | None = None, accum_dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        liger = _require("liger_kernel.transformers", extra="liger", owner=owner)
        self.weight = make_output_weight(hidden_size, vocab_size, weight, owner=owner, device=device, dtype=dtype)
        self.ce_contract = CEContract(vocab_size=vocab_size, reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                      accum_dtype=accum_dtype or self.weight.dtype)
        options: dict[str, Any] = dict(ignore_index=ignore_index, label_smoothing=label_smoothing,
                                       lse_square_scale=z_loss, reduction=reduction)
        if softcap is not None:  # only newer Liger releases know these two; pass them only when asked
            options["softcap"] = softcap
        if accum_dtype is not None:
            options["accum_dtype"] = accum_dtype
        self.loss = liger.LigerFusedLinearCrossEntropyLoss(**options)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat_hidden, flat_targets = _flatten(hidden, targets)
        loss = self.loss(self.weight, flat_hidden, flat_targets)
        return _unflatten(loss, targets, self.ce_contract.reduction)


class CutCrossEntropy(nn.Module):
    """Apple's Cut Cross-Entropy ``linear_cross_entropy(e, c, targets, ...)`` (cut-cross-entropy 25.1.1).

    No label smoothing and no z-loss (this release returns no lse for a caller to add one). Its default
    ``filter_eps="high"`` skips small gradient blocks in backward, an approximation the contract cannot
    express (docs/faults.md #9); pass ``filter_eps=None`` to turn it off. This release sums dL/dh over vocab
    blocks in the input dtype (it has no ``accum_e_fp32``): the contract declares that dtype, and in bf16
    the guard names the short hidden gradient ``accumulator_dtype`` (docs/faults.md #3).
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, weight: nn.Parameter | None = None,
                 reduction: Reduction = "mean", ignore_index: int = -100, softcap: float | None = None,
                 filter_eps: float | str | None = "high", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        self._cce = _require("cut_cross_entropy", extra="cce", owner=owner)
        self.weight = make_output_weight(hidden_size, vocab_size, weight, owner=owner, device=device, dtype=dtype)
        self.ce_contract = CEContract(vocab_size=vocab_size, reduction=reduction, ignore_index=ignore_index,
                                      softcap=softcap, accum_dtype=self.weight.dtype)
        self._options = dict(ignore_index=ignore_index, softcap=softcap, filter_eps=filter_eps)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat_hidden, flat_targets = _flatten(hidden, targets)
        loss = self._cce.linear_cross_entropy(flat_hidden, self.weight, flat_targets,
                                              reduction=self.ce_contract.reduction, **self._options)
        return _unflatten(loss, targets, self.ce_contract.reduction)


class TorchLinearCrossEntropy(nn.Module):
    """PyTorch's ``F.linear_cross_entropy`` (torch >= 2.13), by default on its chunked path.

    With ``options=None`` it is the reference path (materialised logits). Its chunked path accumulates
    in fp32 for bf16/fp16/fp32 inputs unless ``options.acc_dtype`` says otherwise. No z-loss or softcap.
    On torch 2.13 label smoothing leaves the chunked path for the materialised one (with a warning):
    the same loss, without the memory saving.
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, weight: nn.Parameter | None = None,
                 reduction: Reduction = "mean", ignore_index: int = -100, label_smoothing: float = 0.0,
                 options: Any = "chunked", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        if not hasattr(F, "linear_cross_entropy"):
            raise ImportError(f"{owner} needs torch >= 2.13 for torch.nn.functional.linear_cross_entropy,"
                              f" found torch {torch.__version__}. Upgrade torch, or use FusedLinearCrossEntropy.")
        self.weight = make_output_weight(hidden_size, vocab_size, weight, owner=owner, device=device, dtype=dtype)
        self.options = nn.LinearCrossEntropyOptions() if options == "chunked" else options
        acc_dtype = getattr(self.options, "acc_dtype", None)
        self.ce_contract = CEContract(vocab_size=vocab_size, reduction=reduction, ignore_index=ignore_index,
                                      label_smoothing=label_smoothing,
                                      accum_dtype=acc_dtype or torch.promote_types(self.weight.dtype, torch.float32))

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        contract = self.ce_contract
        flat_hidden, flat_targets = _flatten(hidden, targets)
        loss = F.linear_cross_entropy(flat_hidden, self.weight, flat_targets, reduction=contract.reduction,
                                      ignore_index=contract.ignore_index, label_smoothing=contract.label_smoothing,
                                      options=self.options)
        return _unflatten(loss, targets, contract.reduction)


class _LossParallelFn(torch.autograd.Function):
    """Runs ``F.cross_entropy`` on ``Shard(-1)`` DTensor logits, forward *and* backward inside ``loss_parallel()``.

    ``loss_parallel`` needs its context during backward too (outside it, ``nll_loss_backward`` fails on
    mixed Tensor/DTensor arguments), so the DTensor graph is built in forward and replayed here in
    backward, leaving callers a plain tensor and a plain ``loss.backward()``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, mesh, contract: CEContract):
        from torch.distributed.tensor import DTensor, Shard
        from torch.distributed.tensor.parallel import loss_parallel

        ctx.contract = contract
        with torch.enable_grad():
            ctx.hidden = hidden.detach().requires_grad_(hidden.requires_grad)
            ctx.weight = weight.detach().requires_grad_(weight.requires_grad)
            logits = (ctx.hidden @ ctx.weight.T).float()  # (N, V/TP): bf16 matmul, fp32 cross-entropy
            sharded = DTensor.from_local(logits, mesh, [Shard(-1)], run_check=False,
                                         shape=torch.Size([logits.shape[0], contract.vocab_size]),
                                         stride=(contract.vocab_size, 1))  # (N, V) sharded on the vocab
            with loss_parallel():
                loss = F.cross_entropy(sharded, targets, reduction=contract.reduction,
                                       ignore_index=contract.ignore_index)
            ctx.loss = loss.to_local()  # replicated over TP: every rank holds the whole loss
        return ctx.loss.detach()

    @staticmethod
    def backward(ctx, grad_loss):
        from torch.distributed.tensor.parallel import loss_parallel

        inputs = [t for t in (ctx.hidden, ctx.weight) if t.requires_grad]
        with loss_parallel():
            grads = iter(torch.autograd.grad(ctx.loss, inputs, grad_loss))
        grad_hidden = next(grads) if ctx.hidden.requires_grad else None
        grad_weight = next(grads) if ctx.weight.requires_grad else None
        if grad_hidden is not None:  # this slice's share; the full dL/dh sums all vocab slices
            grad_hidden = all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.contract.tp_group)
        ctx.hidden = ctx.weight = ctx.loss = None
        return grad_hidden, grad_weight, None, None, None


class LossParallelCrossEntropy(nn.Module):
    """PyTorch ``loss_parallel()`` + ``F.cross_entropy`` on logits sharded on the vocab over a 1-D TP mesh.

    Tokens are replicated over the mesh; each rank holds the vocab slice DTensor's ``Shard(-1)`` gives
    it (``torch.chunk`` sizes). It materialises this rank's ``[N, V/TP]`` fp32 logits. No label
    smoothing, z-loss or softcap (``loss_parallel`` has none).
    """

    def __init__(self, hidden_size: int, vocab_size: int, tp_mesh: Any, *, weight: nn.Parameter | None = None,
                 reduction: Reduction = "mean", ignore_index: int = -100,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        if tp_mesh.ndim != 1:
            raise ValueError(f"{owner}: `tp_mesh` must be 1-D (loss_parallel supports only that), got a"
                             f" {tp_mesh.ndim}-D mesh. Pass the TP sub-mesh, e.g. mesh['tp'].")
        rank, world = tp_mesh.get_local_rank(), tp_mesh.size()
        slice_size = math.ceil(vocab_size / world)  # Shard's torch.chunk rule: full chunks first
        start, end = min(rank * slice_size, vocab_size), min((rank + 1) * slice_size, vocab_size)
        self.tp_mesh = tp_mesh
        self.ce_contract = CEContract(vocab_size=vocab_size, reduction=reduction, ignore_index=ignore_index,
                                      layout="[S,B,V/TP]", vocab_start=start, vocab_end=end,
                                      tp_group=tp_mesh.get_group())
        self.weight = make_output_weight(hidden_size, end - start, weight, owner=owner, device=device, dtype=dtype)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat_hidden, flat_targets = _flatten(hidden, targets)
        loss = _LossParallelFn.apply(flat_hidden, self.weight, flat_targets, self.tp_mesh, self.ce_contract)
        return _unflatten(loss, targets, self.ce_contract.reduction)
