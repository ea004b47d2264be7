"""Train the hybrid Mamba-2 / attention demo with ce_guard watching its fused output layer.

    python examples/train_hybrid.py fit --config configs/cpu.yaml
    python examples/train_hybrid.py fit --config configs/cpu.yaml --config configs/faults/grad_scale.yaml
    python examples/train_hybrid.py fit --config configs/cpu_tp2.yaml          # TP=2 on 2 CPU processes
    python examples/train_hybrid.py fit --config configs/cpu_tp2_megatron.yaml # TP=2, Megatron-core's output layer

Each run writes under ``<trainer.default_root_dir>/<run id>/``: the parity receipts (``ce_guard/``) and,
with the configs' offline ``WandbLogger``, the W&B files (``wandb/offline-run-*``; ``wandb sync`` uploads
them later). W&B runs offline unless ``WANDB_MODE`` says otherwise; no account or network is needed.
At the end of fit, rank zero prints what the guard saw (checks, drifts, receipts, the report command) and
a run summary (validation losses, throughput, W&B files).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from rich.console import Console
from rich.table import Table

from ce_guard.callbacks import SeamHealthCallback
from ce_guard.demos.data import CppTokenDataModule
from ce_guard.demos.lit import HybridLitModule

# The launcher of a multi-process CPU/GPU run re-executes this script; children inherit the parent's id.
RUN_ID_ENV = "CE_GUARD_RUN_ID"


class RunSummary(Callback):
    """Keep the validation losses and this rank's training throughput, and at the end of fit print them (rank
    zero) with the spikes and where the W&B files are; ``CEParityCallback`` prints what the guard saw.

    Throughput counts every input token of this rank (padding included) over the training time, parity
    checks included and validation excluded.
    """

    def __init__(self) -> None:
        self.val_losses: list[tuple[int, float]] = []
        self.train_tokens = 0
        self.train_seconds = 0.0
        self._clock = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train_tokens += batch[0].numel()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.train_seconds += time.perf_counter() - self._clock

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._clock = time.perf_counter()
        loss = trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.val_losses.append((trainer.global_step, float(loss)))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.val_losses or self.val_losses[-1][0] != trainer.global_step:  # no validation ended the fit
            self.train_seconds += time.perf_counter() - self._clock

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            Console().print(self.table(trainer))

    def table(self, trainer: pl.Trainer) -> Table:
        health = _find(trainer, SeamHealthCallback)
        table = Table(title="run summary", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(overflow="fold")  # paths wrap rather than end in an ellipsis
        if health is not None:
            attributed = sum(s["attribution"] == "seam" for s in health.spikes)
            table.add_row("spikes", f"{len(health.spikes)} ({attributed} attributable to the seam)")
        if self.val_losses:
            table.add_row("val/loss", "  ".join(f"{loss:.3f}@{step}" for step, loss in self.val_losses))
        if self.train_seconds:
            table.add_row("throughput", f"{self.train_tokens / self.train_seconds:,.0f} tokens/s on rank 0"
                          f" ({self.train_tokens:,} tokens in {self.train_seconds:.1f} s, checks included)")
        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        if wandb_logger is not None:
            table.add_row("W&B files", f"{Path(wandb_logger.experiment.dir).parent}  (upload: wandb sync <dir>)")
        return table


def _find(trainer: pl.Trainer, kind: type[Callback]) -> Callback | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, kind)), None)


class HybridCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Give this run its own folder, ``<dir>/<run id>``, under ``default_root_dir`` and each logger's
        ``save_dir``, so the receipts of two runs of one config never share a file."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        run_id = os.environ[RUN_ID_ENV]
        config.trainer.default_root_dir = str(Path(config.trainer.default_root_dir or "runs") / run_id)
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = getattr(logger, "init_args", None)
            if init_args is not None and init_args.get("save_dir"):
                init_args.save_dir = str(Path(init_args.save_dir) / run_id)


def main(args: list[str] | None = None) -> HybridCLI:
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault(RUN_ID_ENV, time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
    started = time.perf_counter()
    cli = HybridCLI(HybridLitModule, CppTokenDataModule, trainer_defaults={"callbacks": [RunSummary()]},
                    save_config_kwargs={"overwrite": True}, args=args)
    if cli.trainer.is_global_zero:
        print(f"total wall time {time.perf_counter() - started:.1f} s")
    return cli


if __name__ == "__main__":
    main()
