"""A training job for the resume test: TinyLM, a check every step, a checkpoint every 2 steps, W&B offline.

python tests/resume_job.py ROOT MAX_STEPS [CKPT]
"""

import os
import sys
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger

sys.path.insert(0, os.path.dirname(__file__))
from ce_guard.callbacks import CEParityCallback  # noqa: E402
from lightning_helpers import TinyLM, token_loader  # noqa: E402


class SlowTinyLM(TinyLM):
    """A step long enough for the test to kill the process between checkpoints."""

    def training_step(self, batch, batch_idx):
        time.sleep(0.3)
        return super().training_step(batch, batch_idx)


def main(root: str, max_steps: int, ckpt: str | None) -> None:
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    logger = WandbLogger(project="ce_guard_resume", id="resume-test", save_dir=root, offline=True)
    checkpoints = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=2, save_top_k=-1,
                                  filename="{step}")
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger,
                         callbacks=[CEParityCallback(every_n_steps=1, run_dir=root), checkpoints],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(SlowTinyLM(), token_loader(batches=64), ckpt_path=ckpt)
    logger.experiment.finish()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
