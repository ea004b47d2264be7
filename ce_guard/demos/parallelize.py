"""Tensor- and data-parallel plans for :class:`~ce_guard.demos.hybrid.HybridLM`, torchtitan style.

``apply_tp`` or ``apply_compile``, then ``apply_fsdp``; each takes plain values, changes the model in place and
logs one line. On a single device call none of them (or only ``apply_compile``, and ``apply_cuda_graphs`` at the
first training step). The output module is left alone: it is vocab-parallel (or not) by its own contract, and
always receives the full, replicated ``(B, S, D)`` hidden states as a plain tensor plus the untouched targets.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.utils import parametrize

from ce_guard.demos.hybrid import ATTENTION, MAMBA, MLP, HybridConfig, HybridLM

logger = logging.getLogger(__name__)

# Per-head (or per-group) parameters of a Mamba-2 mixer; each is sliced along dim 0 like its projection.
MAMBA_HEAD_PARAMS = ("A_log", "D", "dt_bias", "conv_x.weight", "conv_x.bias", "conv_B.weight", "conv_B.bias",
                     "conv_C.weight", "conv_C.bias", "norm.weight")


class _LocalShard(nn.Module):
    """Parametrization that hands the model this rank's rows of a ``Shard(0)`` DTensor parameter.

    Why not a DTensor plan: the scan mixes these parameters with activations that ColwiseParallel has
    already turned into plain local tensors, and DTensor refuses mixed DTensor / Tensor ops. Slicing
    the parameters into plain tensors by hand would work too, but then ``clip_grad_norm_`` and
    distributed checkpoints would see a local slice as if it were the whole parameter. With this
    parametrization the parameter stays a DTensor (global view, correct norms, resharding-aware
    checkpoints) and only the forward sees the local rows; ``to_local``'s backward returns the
    gradient as a ``Shard(0)`` DTensor. Cost: the state-dict key becomes
    ``<module>.parametrizations.<name>.original``.
    """

    def forward(self, param: torch.Tensor) -> torch.Tensor:
        return param.to_local()


def _shard_rows(module: nn.Module, name: str, mesh: DeviceMesh) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    param = getattr(owner, leaf)
    owner.register_parameter(leaf, nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)])))
    parametrize.register_parametrization(owner, leaf, _LocalShard(), unsafe=True)


def _check_divisible(config: HybridConfig, tp: int) -> None:
    names = ("vocab_size", "n_heads", "n_kv_heads", "mamba_n_heads", "mamba_n_groups", "d_ff")
    sizes = {name: getattr(config, name) for name in names}
    bad = {name: size for name, size in sizes.items() if size % tp}
    if bad:
        raise ValueError(f"Expected the TP degree {tp} to divide every sharded size, got {bad}; choose a TP "
                         f"degree that divides them or change the HybridConfig.")


def _seq_divisible_by(tp: int):
    """Pre-hook for the embedding: with an uneven sequence split a 2-rank gloo run (torch 2.13) hung in
    the SP collectives instead of failing, so refuse it on every rank before the first collective."""

    def check(module: nn.Module, args: tuple[torch.Tensor]) -> None:
        if args[0].shape[1] % tp:
            raise ValueError(f"Expected the sequence length to be a multiple of the TP degree {tp} under "
                             f"sequence parallelism, got {args[0].shape[1]}; change `seq_len`.")

    return check


def _mixer_plan(kind: str, seq_layout: Shard | Replicate) -> dict[str, ParallelStyle]:
    """Column-parallel into the heads (or MLP width), row-parallel back to the residual stream."""
    out = RowwiseParallel(output_layouts=seq_layout)
    if kind == ATTENTION:
        return {**{name: ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj")}, "o_proj": out}
    if kind == MLP:
        return {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": out}
    if kind == MAMBA:
        # z/x/dt split by head, B/C by group; heads of a group land on the rank that holds the group.
        cols = ("z_proj", "x_proj", "B_proj", "C_proj", "dt_proj")
        return {**{name: ColwiseParallel() for name in cols}, "out_proj": out}
    raise ValueError(f"Expected a block kind in {(MAMBA, ATTENTION, MLP)}, got {kind!r}.")


def apply_tp(model: HybridLM, tp_mesh: DeviceMesh, *, sequence_parallel: bool) -> None:
    """Shard the model's projections and SSM heads over ``tp_mesh`` (Megatron-style TP).

    With ``sequence_parallel`` the residual stream between blocks is split along the sequence (dim 1)
    and the RMSNorms run on that slice; each mixer all-gathers its input and reduce-scatters its output.
    Without it the residual stream is replicated and each mixer ends in an all-reduce.

    The final hidden states reach ``model.output`` as a plain, replicated ``(B, S, D)`` tensor in both
    cases (under sequence parallel they are all-gathered first); ``model.forward_hidden`` alone returns
    a ``Shard(1)`` DTensor under sequence parallel.

    Raises:
        ValueError: if the TP degree does not divide the vocabulary, a head or group count, or ``d_ff``;
            later, in forward, if it does not divide the sequence length under sequence parallelism.
    """
    _check_divisible(model.config, tp_mesh.size())
    seq_layout = Shard(1) if sequence_parallel else Replicate()
    root_plan: dict[str, ParallelStyle] = {
        # Vocab-parallel embedding: each rank looks up its rows, the sum lands in the residual layout.
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq_layout),
    }
    if sequence_parallel:
        root_plan["norm"] = SequenceParallel()
        root_plan["output"] = PrepareModuleInput(  # gather the sequence: the output module sees (B, S, D)
            input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None), use_local_output=True)
    parallelize_module(model, tp_mesh, root_plan)
    if sequence_parallel:
        model.tok_embeddings.register_forward_pre_hook(_seq_divisible_by(tp_mesh.size()), prepend=True)

    for block in model.layers:
        plan = {f"mixer.{name}": style for name, style in _mixer_plan(block.kind, seq_layout).items()}
        if sequence_parallel:
            plan["norm"] = SequenceParallel()
            plan["mixer"] = PrepareModuleInput(input_layouts=(Shard(1),),
                                               desired_input_layouts=(Replicate(),))
        parallelize_module(block, tp_mesh, plan)
        if block.kind == MAMBA:
            for name in MAMBA_HEAD_PARAMS:
                _shard_rows(block.mixer, name, tp_mesh)
    style = "Tensor + Sequence Parallelism" if sequence_parallel else "Tensor Parallelism"
    logger.info("Applied %s to the model", style)


def apply_compile(model: HybridLM, mode: str = "default") -> None:
    """``torch.compile`` each block in place (its state-dict keys unchanged), before FSDP as torchtitan orders it.

    Why per block: the blocks of a kind share one compiled graph (8 blocks of 3 kinds: 3 graphs), so compiling
    costs one trace per kind; the pointwise work between the matmuls (norms, gates, the scan's discretisation,
    residual adds) fuses into a few kernels; fla's kernels stay opaque (they disable the compiler). Not after
    :func:`apply_tp`: with its parametrized shards the compiled backward fails (torch 2.13). ``mode`` is
    ``torch.compile``'s (``"reduce-overhead"``: CUDA graphs).
    """
    for block in model.layers:
        block.compile(mode=mode)
    logger.info(f"Compiled each block with torch.compile (mode={mode!r})")


def apply_cuda_graphs(model: HybridLM, sample: torch.Tensor) -> None:
    """Replay every block's forward and backward as CUDA graphs (``torch.cuda.make_graphed_callables``).

    Why: with fla's kernels the step is bound by the host (each conv and scan call spends more time in fla's
    Python than on the device), and ``torch.compile``'s own CUDA graphs stop at those calls. A graph captured
    around the whole block replays them too. ``sample`` is the residual stream on the training batches (shape
    and dtype); another shape, and evaluation, run the blocks eagerly. Call inside the step's autocast: the
    capture runs there with the cast cache off, as CUDA graphs require, so the captured casts read the
    parameters in place and see each optimizer step. One CUDA device; the blocks' gradients land in the
    graphs' static buffers, so gradients must not accumulate over micro-batches. Blocks compiled by
    :func:`apply_compile` are captured compiled (the pointwise work fused); their eager fallback is uncompiled.
    """
    blocks = tuple(model.layers)
    eager = [block.forward for block in blocks]
    samples = tuple((torch.randn_like(sample).requires_grad_(),) for _ in blocks)
    device = sample.device.type
    with torch.autocast(device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device),
                        cache_enabled=False):
        torch.cuda.make_graphed_callables(blocks, samples)  # one memory pool, captured in the order they run
    for block, eager_forward in zip(blocks, eager):
        block.forward = functools.partial(_replay_on, sample.shape, sample.dtype, block.forward, eager_forward)
        block._compiled_call_impl = None  # a compiled block was captured compiled; calls now reach the graphs
    logger.info(f"Captured the forward and backward of {len(blocks)} blocks as CUDA graphs, input {tuple(sample.shape)}")


def _replay_on(shape: torch.Size, dtype: torch.dtype, graphed, eager, x: torch.Tensor) -> torch.Tensor:
    """The graphs replay into buffers of the captured shape; any other input runs the block eagerly."""
    return graphed(x) if x.shape == shape and x.dtype == dtype else eager(x)


def apply_fsdp(model: HybridLM, dp_mesh: DeviceMesh, *,
               mp_policy: MixedPrecisionPolicy | None = None) -> None:
    """FSDP2: shard each block on its own (so one block's parameters are gathered at a time), then the root
    (embedding, final norm and output module). Call after :func:`apply_tp` when both are used."""
    kwargs = {"mesh": dp_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for block in model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    logger.info("Applied FSDP to the model")
