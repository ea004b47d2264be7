"""A megatron-core ``GPTModel`` trained by Lightning and guarded in place: no output layer swapped, no loss rewritten.

``configure_model`` initialises Megatron's ``parallel_state`` on the strategy's ``tensor_parallel`` mesh dim
(``ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp)``) and builds a ``GPTModel`` from the local
layer spec; ``training_step`` reduces the per-token losses the model returns as Megatron's training loop does: a
masked mean per micro-batch, gradients averaged over data-parallel ranks, or with ``per_token_loss``
(``calculate_per_token_loss=True``) the masked sum, gradients summed over ranks and divided by the group's token count
(``finalize_model_grads``' divide, moved into the loss). Either way it sets ``MTPLossAutoScaler``'s scale as Megatron's
schedule does, so multi-token prediction's losses get the same divide. ``CEParityCallback`` finds the model by itself
(:mod:`ce_guard.seams.megatron`).

On CPU (gloo ranks) two of Megatron's CUDA-only pieces are avoided, not patched: the local spec's
``DotProductAttention`` takes its scores buffer on the current CUDA device, so :class:`CPUCoreAttention` (the same
interface, torch's causal SDPA) replaces it in the spec; ``model_parallel_cuda_manual_seed`` keeps CUDA generator
states, so the weights are drawn with ``use_cpu_initialization=True``: each full weight from torch's default
generator (one seed on every rank), of which a rank keeps its slice. Dropout is off (it forks the CUDA tracker).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec, get_gpt_mtp_block_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.utils.data import DataLoader, TensorDataset

from ce_guard._dist import group_size
from ce_guard.adapters import megatron_tensor_parallel


class CPUCoreAttention(DotProductAttention):
    """``DotProductAttention`` with causal ``F.scaled_dot_product_attention`` in place of its CUDA score buffer."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        if repeat > 1:  # grouped-query attention: each key/value head serves `repeat` query heads
            key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))                 # (B, H/TP, S, Dh)
        context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        s, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(s, b, self.hidden_size_per_partition)  # (S, B, H*Dh/TP)


class LabelSmoothedGPTModel(GPTModel):
    """GPTModel whose loss passes ``label_smoothing`` to Megatron's vocab-parallel cross-entropy (megatron-core 0.16
    has no config field for it); ``ce_label_smoothing`` tells the guard the value."""

    def __init__(self, *args, label_smoothing: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ce_label_smoothing = label_smoothing

    def compute_language_model_loss(self, labels, logits):
        losses = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous(), self.ce_label_smoothing)
        return losses.transpose(0, 1).contiguous()                                       # [s, b] -> [b, s]


class MegatronGPTLit(pl.LightningModule):
    """Train a tiny megatron-core ``GPTModel`` on ``(tokens, labels, loss_mask)`` batches.

    Args:
        vocab_size: V (divisible by the TP size).
        hidden_size: model width; ``num_heads`` must divide it and be divisible by the TP size.
        num_layers: transformer layers.
        seq_length: the longest sequence (``max_sequence_length``).
        dtype: ``torch.bfloat16`` wraps the model in Megatron's ``Float16Module``, as its ``--bf16`` does.
        label_smoothing: Megatron's convention (eps spread over the V - 1 other classes); builds a
            :class:`LabelSmoothedGPTModel`.
        mtp_num_layers: multi-token prediction depths (None: off).
        tie_embeddings: ``share_embeddings_and_output_weights``.
        cross_entropy_fusion: ``cross_entropy_loss_fusion`` with Megatron's ``native`` implementation.
        per_token_loss: ``calculate_per_token_loss``: every token of the data-parallel group weighs alike (one
            micro-batch per step: the divide needs the step's whole count).
        lr: SGD learning rate.
        seed: the weights' seed, the same on every rank.
    """

    def __init__(self, vocab_size: int = 256, hidden_size: int = 32, num_heads: int = 4, num_layers: int = 2,
                 seq_length: int = 16, dtype: torch.dtype = torch.float32, label_smoothing: float = 0.0,
                 mtp_num_layers: int | None = None, tie_embeddings: bool = False, cross_entropy_fusion: bool = False,
                 per_token_loss: bool = False, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.options = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_heads=num_heads,
                            num_layers=num_layers, seq_length=seq_length, dtype=dtype, label_smoothing=label_smoothing,
                            mtp_num_layers=mtp_num_layers, tie_embeddings=tie_embeddings,
                            cross_entropy_fusion=cross_entropy_fusion, per_token_loss=per_token_loss, seed=seed)
        self.lr = lr
        self.model: GPTModel | Float16Module | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        o = self.options
        mesh = self.device_mesh
        megatron_tensor_parallel(mesh["tensor_parallel"].get_group() if mesh is not None else None)
        config = TransformerConfig(
            num_layers=o["num_layers"], hidden_size=o["hidden_size"], num_attention_heads=o["num_heads"],
            hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True, params_dtype=o["dtype"],
            bf16=o["dtype"] == torch.bfloat16, tensor_model_parallel_size=mesh["tensor_parallel"].size() if mesh else 1,
            mtp_num_layers=o["mtp_num_layers"], cross_entropy_loss_fusion=o["cross_entropy_fusion"],
            cross_entropy_fusion_impl="native", calculate_per_token_loss=o["per_token_loss"])
        spec = get_gpt_layer_local_spec()
        spec.submodules.self_attention.submodules.core_attention = CPUCoreAttention
        extra = {}
        if o["mtp_num_layers"]:
            extra["mtp_block_spec"] = get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False)
        cls = GPTModel
        if o["label_smoothing"]:
            cls, extra["label_smoothing"] = LabelSmoothedGPTModel, o["label_smoothing"]
        torch.manual_seed(o["seed"])  # every rank draws the same full weights and keeps its slice
        model = cls(config=config, transformer_layer_spec=spec, vocab_size=o["vocab_size"],
                    max_sequence_length=o["seq_length"], share_embeddings_and_output_weights=o["tie_embeddings"],
                    **extra)
        # Megatron's --bf16: the whole model in bf16 (norms included), per-token losses handed back in fp32.
        self.model = Float16Module(config, model) if config.bf16 else model

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        b, s = tokens.shape
        positions = torch.arange(s, device=tokens.device).expand(b, s)
        return self.model(tokens, positions, None, labels=labels, loss_mask=loss_mask)  # (B, S) per-token losses

    def training_step(self, batch, batch_idx):
        tokens, labels, loss_mask = batch
        mask = loss_mask.float()
        if self.options["per_token_loss"]:
            if self.trainer.accumulate_grad_batches != 1:
                raise ValueError("per_token_loss divides by the step's token count over the data-parallel"
                                 " group, which this module knows for one micro-batch per step: set"
                                 " accumulate_grad_batches=1.")
            count = mask.sum()
            if group_size(self._dp_group()) > 1:
                dist.all_reduce(count, group=self._dp_group())  # finalize_model_grads' num_tokens
            scale = 1.0 / count.clamp(min=1)
            MTPLossAutoScaler.set_loss_scale(scale)  # the schedule's scale (no fp16 scaler: 1), the divide folded in
            return (self(tokens, labels, loss_mask) * mask).sum() * scale
        MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0 / self.trainer.accumulate_grad_batches))  # 1 / micro-batches
        losses = self(tokens, labels, loss_mask)
        return (losses * mask).sum() / mask.sum()  # Megatron's masked mean over this micro-batch's tokens

    def on_before_optimizer_step(self, optimizer) -> None:
        """Megatron's data-parallel gradient reduction: summed with ``calculate_per_token_loss``, else averaged."""
        group = self._dp_group()
        ranks = group_size(group)
        if ranks == 1:
            return
        for param in self.model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad, group=group)
                if not self.options["per_token_loss"]:
                    param.grad /= ranks

    def _dp_group(self) -> dist.ProcessGroup | None:
        mesh = self.device_mesh
        return mesh["data_parallel"].get_group() if mesh is not None else None

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)


def next_token_loader(vocab_size: int = 256, seq_length: int = 16, batches: int = 100, batch_size: int = 2,
                      seed: int = 0) -> DataLoader:
    """Random sequences as ``(tokens, labels = the next tokens, loss_mask)``; each row's tail is padding of a
    different length (``loss_mask`` 0), so micro-batches count unequal tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = batches * batch_size
    ids = torch.randint(0, vocab_size, (rows, seq_length + 1), generator=gen)
    valid = seq_length - torch.randint(0, seq_length // 2, (rows, 1), generator=gen)     # (rows, 1)
    loss_mask = (torch.arange(seq_length).expand(rows, seq_length) < valid).float()        # (rows, S)
    return DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:], loss_mask), batch_size=batch_size)
