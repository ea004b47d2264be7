"""LightningModule for the hybrid demo: builds the model with a guarded fused output, its parallel plan, AdamW.

``configure_model`` reads the strategy's device mesh: under ``ModelParallelStrategy`` the output layer is
ce_guard's vocab-parallel :class:`~ce_guard.fused.FusedLinearCrossEntropy` over the ``tensor_parallel`` dim
(or Megatron-core's, :class:`~ce_guard.adapters.MegatronOutputLayer`), normalised by the global token count
of the ``data_parallel`` dim, and the plan of ``parallelize.py`` is applied (TP, then FSDP2). On one device
ce_guard's layer holds the whole vocabulary. Either way the layer declares an honest ``CEContract``;
``fault`` swaps in ``ce_guard.testing``'s faulty layer, which computes a broken one, for demonstrations.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.optim.lr_scheduler import LambdaLR

from ce_guard.contract import CEContract
from ce_guard.demos.data import IGNORE_INDEX
from ce_guard.demos.hybrid import HybridConfig, HybridLM
from ce_guard.demos.parallelize import apply_compile, apply_cuda_graphs, apply_fsdp, apply_tp
from ce_guard.fused import FusedLinearCrossEntropy
from ce_guard.testing import LAYER_FAULTS, fused_layer

OUTPUT_LAYERS = ("ce_guard", "megatron", "transformer_engine", "fla")
PEER_OUTPUT_LAYERS = OUTPUT_LAYERS[1:]  # another package's loss: no injected faults, no z-loss
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


class HybridLitModule(pl.LightningModule):
    """Train a :class:`~ce_guard.demos.hybrid.HybridLM` whose output layer is guarded by ce_guard.

    Args:
        config: the model's shape; ``vocab_size`` must cover the data's token ids (the example CLI links it
            to ``CppTokenDataModule.vocab_size``).
        lr: peak AdamW learning rate, reached after ``warmup_steps`` and decayed by a cosine to
            ``min_lr_ratio * lr`` at the last step.
        weight_decay: AdamW decay on matrices (ndim >= 2); vectors (norms, SSM heads' A, D, dt) get none.
        betas: AdamW betas.
        warmup_steps: linear warm-up from ``lr / warmup_steps``.
        min_lr_ratio: the cosine's floor, as a fraction of ``lr``.
        label_smoothing: the output layer's label smoothing: PyTorch's formula over the global vocabulary for
            ce_guard's layer; Megatron's convention (eps / (V - 1) on every non-target class) for Megatron's.
        z_loss: the contract's coefficient on ``lse**2``.
        token_chunk: tokens per chunk of the fused layer; ``None`` lets it choose.
        sequence_parallel: under TP, split the residual stream along the sequence between blocks. The
            output layer still receives the full ``(B, S, D)`` hidden states (``apply_tp`` gathers them), so
            its layout is ``[S,B,V/TP]`` either way.
        output_layer: ``"ce_guard"`` (its fused layer); ``"megatron"`` (Megatron-core's ColumnParallelLinear
            and vocab-parallel cross-entropy, under ``ModelParallelStrategy`` only; the ``megatron`` extra);
            ``"transformer_engine"`` (TE's ``parallel_cross_entropy`` over this rank's vocab slice, a mean over
            each rank's tokens; the ``te`` extra, CUDA); ``"fla"`` (flash-linear-attention's fused linear-CE,
            the whole vocabulary on each rank, no TP; fla-core, CUDA).
        l2_warp: flash-linear-attention's L2-warp penalty factor, with ``output_layer="fla"`` only.
        fault: for demonstrations: a switch of ``ce_guard.testing.LAYER_FAULTS`` (e.g. ``"grad_scale"``); the
            output layer is then ``ce_guard.testing.FaultyFusedLinearCrossEntropy``, which computes that broken
            contract while declaring the honest one.
        fault_scale: the integer k of ``grad_scale``.
        compile: ``torch.compile`` each block (before FSDP; see ``parallelize.apply_compile``); not under TP.
        compile_mode: ``torch.compile``'s mode for the blocks: ``"reduce-overhead"`` replays each compiled
            region as a CUDA graph, for a step whose host launches kernels slower than the device runs them.
        cuda_graphs: capture each block's forward and backward as CUDA graphs at the first training step and
            replay them after (``parallelize.apply_cuda_graphs``): unlike ``reduce-overhead`` the graphs hold
            fla's kernels too. One CUDA device, no gradient accumulation; with ``compile`` the compiled blocks
            are captured.
        seed: seeds the weights; every rank builds the same full model before the plan shards it.

    Example:
        >>> module = HybridLitModule(HybridConfig(vocab_size=100352, d_model=128, layer_pattern="M*M-"))
        >>> trainer = Trainer(max_steps=100).fit(module, datamodule=CppTokenDataModule(seq_len=128))
    """

    def __init__(
        self,
        config: HybridConfig,
        *,
        lr: float = 3e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.1,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        token_chunk: int | None = None,
        sequence_parallel: bool = False,
        output_layer: Literal["ce_guard", "megatron", "transformer_engine", "fla"] = "ce_guard",
        l2_warp: float = 0.0,
        fault: str | None = None,
        fault_scale: int = 2,
        compile: bool = False,
        compile_mode: str = "default",
        cuda_graphs: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(config, HybridConfig):
            raise TypeError(f"Expected `config` to be a HybridConfig, got {type(config).__name__}.")
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"Expected `lr` > 0 and `weight_decay` >= 0, got lr={lr}, weight_decay={weight_decay}.")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"Expected `warmup_steps` to be an int >= 0, got {warmup_steps!r}.")
        if not 0 <= min_lr_ratio <= 1:
            raise ValueError(f"Expected `min_lr_ratio` in [0, 1], got {min_lr_ratio}.")
        if fault is not None and fault not in LAYER_FAULTS:
            raise ValueError(f"Expected `fault` to be None or one of {list(LAYER_FAULTS)}, got {fault!r}.")
        if output_layer not in OUTPUT_LAYERS:
            raise ValueError(f"Expected `output_layer` to be one of {OUTPUT_LAYERS}, got {output_layer!r}.")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"Expected `compile_mode` to be one of {COMPILE_MODES}, got {compile_mode!r}.")
        if cuda_graphs and compile and compile_mode == "reduce-overhead":
            raise ValueError("Expected `cuda_graphs=False` with compile_mode='reduce-overhead': both capture CUDA"
                             " graphs; `cuda_graphs` alone captures the whole block (compile_mode='default').")
        if output_layer in PEER_OUTPUT_LAYERS and (fault is not None or z_loss):
            raise ValueError(f"Expected no `fault` and no `z_loss` with output_layer={output_layer!r} (got"
                             f" fault={fault!r}, z_loss={z_loss}): that layer runs its package's own code; the"
                             " injected faults and the z-loss live in ce_guard's layer.")
        if l2_warp and output_layer != "fla":
            raise ValueError(f"Expected `l2_warp=0` with output_layer={output_layer!r}: the L2-warp penalty is"
                             " flash-linear-attention's; use output_layer='fla'.")
        self.save_hyperparameters()
        self.config = config
        self.model: HybridLM | None = None  # built in configure_model, once the device mesh is known
        self._graphed = False

    # ------------------------------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:  # Lightning calls this hook again for fit -> validate -> test
            return
        mesh: DeviceMesh | None = self.device_mesh
        torch.manual_seed(self.hparams.seed)  # same full weights on every rank before sharding
        if mesh is None:
            if self.hparams.output_layer == "megatron":
                raise ValueError("output_layer='megatron' needs a device mesh: train with Lightning's"
                                 " ModelParallelStrategy (e.g. configs/cpu_tp2_megatron.yaml).")
            whole = slice(0, self.config.vocab_size)
            output = (self._peer_output(None, whole) if self.hparams.output_layer in PEER_OUTPUT_LAYERS
                      else self._output(self._contract(), whole))
            self.model = HybridLM(self.config, output)
            if self.hparams.compile:
                apply_compile(self.model, mode=self.hparams.compile_mode)
            return
        tp, dp = mesh["tensor_parallel"], mesh["data_parallel"]
        if self.hparams.compile and tp.size() > 1:
            raise ValueError("Expected `compile=False` under tensor parallelism: compiled blocks fail in backward there"
                             " (a DTensor redistribution receives a plain gradient, torch 2.13). Compile runs on one"
                             " device and under data parallelism alone.")
        if self.config.vocab_size % tp.size():
            raise ValueError(f"Expected the TP degree {tp.size()} to divide `config.vocab_size`="
                             f"{self.config.vocab_size}; pad the vocabulary (CppTokenDataModule pads to 128).")
        rows = self.config.vocab_size // tp.size()
        start = tp.get_local_rank() * rows
        if self.hparams.output_layer == "megatron":
            output = self._megatron_output(tp, dp, slice(start, start + rows))
        elif self.hparams.output_layer in PEER_OUTPUT_LAYERS:
            output = self._peer_output(tp, slice(start, start + rows))
        else:
            output = self._output(self._contract(
                layout="[S,B,V/TP]" if tp.size() > 1 else "[N,V]", vocab_start=start, vocab_end=start + rows,
                tp_group=tp.get_group(), normalize_by="global_tokens", token_group=dp.get_group()),
                slice(start, start + rows))
        self.model = HybridLM(self.config, output)
        if tp.size() > 1:
            apply_tp(self.model, tp, sequence_parallel=self.hparams.sequence_parallel)
        if self.hparams.compile:
            apply_compile(self.model, mode=self.hparams.compile_mode)
        if dp.size() > 1:
            apply_fsdp(self.model, dp)

    def _contract(self, **placement) -> CEContract:
        return CEContract(vocab_size=self.config.vocab_size, ignore_index=IGNORE_INDEX,
                          label_smoothing=self.hparams.label_smoothing, z_loss=self.hparams.z_loss, **placement)

    def _output(self, contract: CEContract, rows: slice) -> FusedLinearCrossEntropy:
        """The guarded output layer, holding ``rows`` of one full output weight drawn on every rank alike."""
        return fused_layer(self.config.d_model, contract, weight=self._output_weight(rows),
                           token_chunk=self.hparams.token_chunk, fault=self.hparams.fault,
                           fault_scale=self.hparams.fault_scale)

    def _megatron_output(self, tp: DeviceMesh, dp: DeviceMesh, rows: slice) -> nn.Module:
        """Megatron-core's output layer on the mesh's TP dim; the same weight rows as ce_guard's would hold."""
        from ce_guard.adapters import MegatronOutputLayer

        return MegatronOutputLayer(self.config.d_model, self.config.vocab_size, tp_group=tp.get_group(),
                                   weight=self._output_weight(rows), label_smoothing=self.hparams.label_smoothing,
                                   ignore_index=IGNORE_INDEX, normalize_by="global_tokens", token_group=dp.get_group())

    def _peer_output(self, tp: DeviceMesh | None, rows: slice) -> nn.Module:
        """Transformer Engine's or flash-linear-attention's loss behind ce_guard's adapter, each declaring the
        contract it keeps (a mean over this rank's tokens); the same weight rows as ce_guard's layer would hold."""
        d, v, weight = self.config.d_model, self.config.vocab_size, self._output_weight(rows)
        if self.hparams.output_layer == "transformer_engine":
            from ce_guard.adapters import TransformerEngineCrossEntropy

            return TransformerEngineCrossEntropy(d, v, label_smoothing=self.hparams.label_smoothing,
                                                 ignore_index=IGNORE_INDEX, weight=weight,
                                                 tp_group=tp.get_group() if tp is not None and tp.size() > 1 else None)
        if tp is not None and tp.size() > 1:
            raise ValueError("output_layer='fla' holds the whole vocabulary on each rank: train it without tensor"
                             " parallelism (tensor_parallel_size=1), or use output_layer='transformer_engine'.")
        from ce_guard.fla_adapter import FlaFusedLinearCrossEntropy

        return FlaFusedLinearCrossEntropy(d, v, weight=weight, ignore_index=IGNORE_INDEX,
                                          label_smoothing=self.hparams.label_smoothing, l2_warp=self.hparams.l2_warp)

    def _output_weight(self, rows: slice) -> nn.Parameter:
        d = self.config.d_model
        full = torch.empty(self.config.vocab_size, d).normal_(std=d ** -0.5)  # (V, D)
        return nn.Parameter(full[rows].clone())                               # (V/TP, D)

    # ------------------------------------------------------------------------------------------ steps
    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, targets)

    def on_fit_start(self) -> None:
        if not self.hparams.cuda_graphs:
            return
        if self.device.type != "cuda" or self.trainer.world_size > 1:
            raise ValueError(f"Expected one CUDA device for `cuda_graphs=True`, got {self.trainer.world_size} x"
                             f" {self.device.type}; set cuda_graphs=False.")
        if self.trainer.accumulate_grad_batches > 1:
            raise ValueError("Expected `accumulate_grad_batches=1` with `cuda_graphs=True`: the graphs write each"
                             " backward's gradients into the same buffers, so micro-batches would not add up.")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.hparams.cuda_graphs and not self._graphed:
            input_ids = batch[0]
            embedding = self.model.tok_embeddings.weight
            apply_cuda_graphs(self.model, embedding.new_empty(*input_ids.shape, embedding.shape[1]))
            self._graphed = True
        loss = self(*batch)
        # Under DP each rank's loss is its share of the global mean; the mean over ranks is that mean.
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self(*batch), prog_bar=True, sync_dist=True)

    # -------------------------------------------------------------------------------------- optimizer
    def configure_optimizers(self):
        # One group per (decay, device mesh): AdamW's foreach kernels cannot mix plain tensors with DTensors,
        # nor DTensors of different meshes (the vocab-parallel output weight is plain under TP and lives on
        # the DP mesh under FSDP, while the TP-sharded projections live on the TP or 2-D mesh).
        groups: dict[tuple, list[nn.Parameter]] = {}
        for p in self.parameters():
            if p.requires_grad:
                groups.setdefault((p.ndim >= 2, getattr(p, "device_mesh", None)), []).append(p)
        groups = [{"params": params, "weight_decay": self.hparams.weight_decay if decay else 0.0}
                  for (decay, _), params in groups.items()]
        # Fused on CUDA (one kernel for all parameters of a group); foreach elsewhere.
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                      fused=self.device.type == "cuda")
        schedule = warmup_cosine(self.hparams.warmup_steps, int(self.trainer.estimated_stepping_batches),
                                 self.hparams.min_lr_ratio)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning does, also for fused AdamW under bf16-mixed.

        Lightning's mixed precision refuses to clip for an optimizer that unscales gradients in its own step,
        which fused AdamW declares; without a grad scaler (bf16) nothing is scaled, so the base plugin's clipping
        is exact. With fp16's scaler, Lightning's refusal stands.
        """
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


def warmup_cosine(warmup_steps: int, total_steps: int, min_ratio: float):
    """Multiplier of the peak lr at optimizer step ``step``: linear warm-up, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
