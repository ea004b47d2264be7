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

from ce_guard._dist import all_gather_dim0, all_reduce, group_size, is_distributed
from ce_guard.contract import CEContract, GradSync, NormalizeBy, Reduction
from ce_guard.fused import make_output_weight

__all__ = ["CutCrossEntropy", "FlaFusedLinearCrossEntropy", "FlaL2WarpCrossEntropy",
           "LigerFusedLinearCrossEntropy", "LossParallelCrossEntropy", "MegatronOutputLayer", "TorchLinearCrossEntropy",
           "TransformerEngineCrossEntropy", "megatron_tensor_parallel"]


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
    blocks in the input dtype (it has no ``accum_e_fp32``), which the contract declares; its dL/dh error
    stays above the bf16 budget with the filter off too (docs/benchmarks.md).
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


def megatron_tensor_parallel(tp_group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    """Megatron-core's ``parallel_state`` on the ranks of ``tp_group``; returns Megatron's TP group.

    Megatron's losses read their TP group from ``parallel_state``. Under Lightning's ``ModelParallelStrategy``
    pass the mesh's tensor-parallel dim (``device_mesh["tensor_parallel"].get_group()``): Megatron's default
    order puts TP innermost, as the ``(data_parallel, tensor_parallel)`` mesh does, so both name the same ranks.
    Initialises ``parallel_state`` when nothing has (a collective: call it on every rank), and refuses a state
    someone else initialised over other ranks.

    Raises:
        RuntimeError: if torch.distributed is not initialised (a world of one is enough).
        ValueError: if Megatron's TP group and ``tp_group`` hold different ranks.
    """
    _require("megatron.core", extra="megatron", owner="megatron_tensor_parallel")
    from megatron.core import parallel_state

    if not is_distributed():
        raise RuntimeError("Megatron-core's losses all-reduce over its tensor-parallel group, so torch.distributed"
                           " must be initialised first (a world of one is enough: torch.distributed."
                           "init_process_group('gloo', rank=0, world_size=1, ...)), or run under a Lightning strategy.")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=group_size(tp_group),
                                                 create_gloo_process_groups=False)
    megatron_group = parallel_state.get_tensor_model_parallel_group()
    wanted = dist.get_process_group_ranks(tp_group) if tp_group is not None else [dist.get_rank()]
    found = dist.get_process_group_ranks(megatron_group)
    if found != wanted:
        raise ValueError(f"Megatron-core's tensor-parallel group holds ranks {found}, but the output layer's"
                         f" `tp_group` holds {wanted}. Initialise megatron.core.parallel_state with the mesh's TP"
                         " size and order, or pass its TP group as `tp_group`.")
    return megatron_group


class MegatronOutputLayer(nn.Module):
    """Megatron-core's output layer and loss, as its language models and training loop run them.

    ``ColumnParallelLinear`` (weight ``[V/TP, D]``, this rank's slice by Megatron's own vocab-range rule; its
    copy-to-TP-region all-reduces dL/dh, or with ``sequence_parallel`` it all-gathers the sequence and
    reduce-scatters dL/dh), then ``tensor_parallel.vocab_parallel_cross_entropy`` (the loss of
    ``LanguageModule.compute_language_model_loss``; with ``cross_entropy_fusion=True`` the 'native'
    ``fused_vocab_parallel_cross_entropy``), then the training loop's masked mean: the per-token losses times
    the loss mask (targets != ``ignore_index``), summed, over this rank's token count or the count summed
    over ``token_group``.

    Its fused 'native' cross-entropy casts the logit gradient to bf16 whatever the logits' dtype: clean in a
    bf16 run, named ``accumulator_dtype`` in an fp32 one (docs/faults.md #3).

    ``label_smoothing`` is Megatron's: ``eps / (K - 1)`` on every non-target class. The contract states it in
    PyTorch's formula, ``eps * V / (V - 1)`` over the global V, which is what Megatron means; its code takes K
    as the local partition (docs/faults.md #6), so at TP > 1 the guard names ``label_smoothing_local_v``.
    Under ``sequence_parallel`` (CUDA only: Megatron gathers into a CUDA buffer) hidden is this rank's
    ``[S/TP, B, D]`` shard and targets its ``[S/TP, B]`` shard, sequence first, as Megatron lays them out.

    Args:
        hidden_size: D.
        vocab_size: the global V; the TP size must divide it.
        tp_group: the tensor-parallel group (under Lightning, ``device_mesh["tensor_parallel"].get_group()``);
            :func:`megatron_tensor_parallel` makes Megatron's ``parallel_state`` agree with it.
        weight: this rank's ``[V/TP, D]`` slice to borrow; a fresh one otherwise.
        normalize_by, token_group, grad_sync: who owns the mean's divide, as in :class:`CEContract`.

    Example:
        >>> layer = MegatronOutputLayer(1024, 32768, tp_group=mesh["tensor_parallel"].get_group())
        >>> loss = layer(hidden, targets)
    """

    def __init__(self, hidden_size: int, vocab_size: int, *, tp_group: dist.ProcessGroup | None = None,
                 weight: nn.Parameter | None = None, label_smoothing: float = 0.0, cross_entropy_fusion: bool = False,
                 sequence_parallel: bool = False, reduction: Reduction = "mean",
                 normalize_by: NormalizeBy = "local_tokens", token_group: dist.ProcessGroup | None = None,
                 grad_sync: GradSync = "average", ignore_index: int = -100,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        _require("megatron.core", extra="megatron", owner=owner)
        from megatron.core import tensor_parallel
        from megatron.core.model_parallel_config import ModelParallelConfig
        from megatron.core.tensor_parallel.utils import VocabUtility

        if cross_entropy_fusion and label_smoothing:
            raise ValueError(f"{owner}: Megatron's fused vocab-parallel cross-entropy has no label smoothing, got"
                             f" label_smoothing={label_smoothing}. Set cross_entropy_fusion=False to smooth.")
        self.tp_group = megatron_tensor_parallel(tp_group)
        tp, rank = group_size(self.tp_group), dist.get_rank(self.tp_group)
        if vocab_size % tp:
            raise ValueError(f"{owner}: Megatron slices the vocabulary evenly, so the TP size {tp} must divide"
                             f" `vocab_size`={vocab_size}; pad the vocabulary to a multiple of {tp}.")
        start, end = VocabUtility.vocab_range_from_global_vocab_size(vocab_size, rank, tp)
        self.weight = make_output_weight(hidden_size, end - start, weight, owner=owner, device=device, dtype=dtype)
        if sequence_parallel and tp > 1 and self.weight.device.type != "cuda":
            raise ValueError(f"{owner}: Megatron's sequence-parallel all-gather writes into a CUDA buffer, so"
                             f" sequence_parallel=True needs the weight on a GPU (found {self.weight.device}). On CPU"
                             " gather the sequence before the layer and pass sequence_parallel=False.")
        config = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel and tp > 1,
                                     use_cpu_initialization=True, params_dtype=self.weight.dtype)
        self.projection = tensor_parallel.ColumnParallelLinear(
            hidden_size, vocab_size, config=config, init_method=nn.init.zeros_, bias=False, gather_output=False,
            skip_bias_add=True, skip_weight_param_allocation=True, tp_group=self.tp_group)
        self.label_smoothing, self.cross_entropy_fusion = label_smoothing, cross_entropy_fusion
        self._tensor_parallel = tensor_parallel
        layout = "[S/SP,B,V/TP]" if config.sequence_parallel else ("[S,B,V/TP]" if tp > 1 else "[N,V]")
        self.ce_contract = CEContract(
            vocab_size=vocab_size, reduction=reduction, normalize_by=normalize_by, token_group=token_group,
            grad_sync=grad_sync, ignore_index=ignore_index,
            label_smoothing=label_smoothing * vocab_size / (vocab_size - 1), accum_dtype=torch.float32,
            layout=layout, vocab_start=start, vocab_end=end, tp_group=self.tp_group)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        contract = self.ce_contract
        if contract.sequence_parallel:  # the loss sees the gathered sequence, as ColumnParallelLinear's output does
            targets = all_gather_dim0(targets, contract.tp_group)                       # (S, B)
        hidden_3d = hidden if hidden.dim() == 3 else hidden.reshape(-1, 1, hidden.shape[-1])  # (S[/SP], B, D)
        logits, _ = self.projection(hidden_3d, weight=self.weight)                     # (S, B, V/TP)
        labels = targets.reshape(logits.shape[:-1])                                     # (S, B)
        if self.cross_entropy_fusion:
            from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

            per_token = fused_vocab_parallel_cross_entropy(logits, labels, self.tp_group)
        else:
            per_token = self._tensor_parallel.vocab_parallel_cross_entropy(logits, labels, self.label_smoothing)
        mask = labels != contract.ignore_index                                          # Megatron's loss_mask
        masked = per_token * mask
        if contract.reduction == "none":
            return masked.reshape(targets.shape)
        if contract.reduction == "sum":
            return masked.sum()
        count = mask.sum().float()
        if contract.normalize_by == "global_tokens":
            all_reduce(count, dist.ReduceOp.SUM, contract.token_group)
            if contract.grad_sync == "average":
                count = count / group_size(contract.token_group)
        return masked.sum() / count.clamp(min=1.0)


# Adapters kept in modules of their own, for length (imported last: they import this module's neighbours only).
from ce_guard.fla_adapter import FlaFusedLinearCrossEntropy, FlaL2WarpCrossEntropy
from ce_guard.te_adapter import TransformerEngineCrossEntropy
