"""A small LightningModule around the real fused output layer, a logger that remembers, and token data."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ce_guard.contract import CEContract
from ce_guard.receipt import read_receipts
from ce_guard.testing import fused_layer


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call: exact assertions on what the panels would receive."""

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []
        self._save_dir = save_dir

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    @property
    def log_dir(self) -> str:
        return self._save_dir

    @property
    def save_dir(self) -> str:
        return self._save_dir

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def parity_steps(self) -> list[int]:
        return [step for step, metrics in self.calls if "ce_parity/loss_fused" in metrics]


class TinyLM(pl.LightningModule):
    """Embedding -> tanh(linear) -> guarded fused output. ``make_output(hidden_size)`` builds the seam."""

    def __init__(self, vocab: int = 96, hidden: int = 16, contract: CEContract | None = None, fault=None,
                 fault_scale: int = 2, token_chunk: int = 16, precision_dtype: torch.dtype = torch.float32,
                 manual: bool = False, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        contract = contract or CEContract(vocab_size=vocab)
        self.output = fused_layer(hidden, contract, fault=fault, fault_scale=fault_scale, token_chunk=token_chunk,
                                  weight=self.embed.weight if tie else None)
        self.automatic_optimization = not manual

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.mix(self.embed(tokens)))  # (B, S, D)
        return self.output(hidden, targets)

    def training_step(self, batch, batch_idx):
        loss = self(*batch)
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def receipts(tmp_path) -> list[dict]:
    """The receipts a fit under ``default_root_dir=tmp_path`` wrote."""
    return list(read_receipts(tmp_path / "ce_guard" / "receipts.jsonl"))


def token_loader(vocab: int = 96, batches: int = 8, batch_size: int = 4, seq: int = 12, pad_every: int = 5,
                 seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batches * batch_size, seq), generator=gen)
    targets = torch.randint(0, vocab, (batches * batch_size, seq), generator=gen)
    targets[:, ::pad_every] = -100
    return DataLoader(TensorDataset(tokens, targets), batch_size=batch_size)


def trainer(tmp_path, callbacks, *, max_steps: int = 6, logger=True, **kwargs) -> tuple[pl.Trainer, RecordingLogger | None]:
    log = RecordingLogger(str(tmp_path)) if logger else None
    kwargs.setdefault("enable_checkpointing", False)
    t = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=log if logger else False,
                   callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=str(tmp_path), **kwargs)
    return t, log


class MeshTinyLM(TinyLM):
    """TinyLM for ModelParallelStrategy: the output is vocab-parallel over the TP dim, FSDP2 over the DP dim."""

    def __init__(self, vocab: int = 96, hidden: int = 16, fault=None, global_tokens: bool = True,
                 nan_on_rank: int | None = None) -> None:
        super().__init__(vocab, hidden)
        self.vocab, self.fault, self.global_tokens, self.nan_on_rank = vocab, fault, global_tokens, nan_on_rank

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        tp, dp = self.device_mesh["tensor_parallel"], self.device_mesh["data_parallel"]
        rows = self.vocab // tp.size()
        start = tp.get_local_rank() * rows
        contract = CEContract(
            vocab_size=self.vocab, layout="[S,B,V/TP]" if tp.size() > 1 else "[N,V]", vocab_start=start,
            vocab_end=start + rows, tp_group=tp.get_group(),
            normalize_by="global_tokens" if self.global_tokens else "local_tokens",
            token_group=dp.get_group() if self.global_tokens else None)
        torch.manual_seed(0)
        full = torch.randn(self.vocab, self.embed.embedding_dim) * 0.1
        self.output = fused_layer(self.embed.embedding_dim, contract, fault=self.fault, token_chunk=16,
                                  weight=nn.Parameter(full[start:start + rows].clone()))
        if dp.size() > 1:
            fully_shard(self, mesh=dp)

    def forward(self, tokens, targets):
        hidden = torch.tanh(self.mix(self.embed(tokens)))
        if self.nan_on_rank is not None and self.global_rank == self.nan_on_rank:
            hidden = hidden * float("nan")
        return self.output(hidden, targets)


def uneven_padding_loader(vocab: int = 96, rows: int = 32, seq: int = 12) -> DataLoader:
    """Even rows pad half their targets, odd rows one in six: DP rank 0 and rank 1 see unequal counts."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (rows, seq), generator=gen)
    targets = torch.randint(0, vocab, (rows, seq), generator=gen)
    targets[0::2, : seq // 2] = -100
    targets[1::2, ::6] = -100
    return DataLoader(TensorDataset(tokens, targets), batch_size=4)
