"""A small LightningModule around the real fused output layer, a logger that remembers, and token data."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ce_guard.contract import CEContract
from ce_guard.fused import FusedLinearCrossEntropy


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
        self.output = FusedLinearCrossEntropy(hidden, contract, fault=fault, fault_scale=fault_scale,
                                              token_chunk=token_chunk,
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
