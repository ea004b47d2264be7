"""A training job for the resume test: TinyLM, a check every step, a checkpoint every 2 steps, W&B offline.

python tests/resume_job.py ROOT MAX_STEPS [CKPT]

Launched once per rank with WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set (as torchrun sets
them), the processes train as DDP ranks over gloo. Each rank leaves its parity callback's state in
ROOT/parity_rank{RANK}.json: the checkpoint holds rank zero's only.
"""

import json
import os
import sys
import time

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy

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
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    logger = WandbLogger(project="ce_guard_resume", id="resume-test", save_dir=root, offline=True)
    parity = CEParityCallback(every_n_steps=1, run_dir=root)
    checkpoints = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=2, save_top_k=-1,
                                  filename="{step}")
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=world_size,
                         strategy=DDPStrategy(process_group_backend="gloo") if world_size > 1 else "auto",
                         logger=logger, callbacks=[parity, checkpoints], enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=root)
    trainer.fit(SlowTinyLM(), token_loader(batches=64), ckpt_path=ckpt)
    logger.experiment.finish()
    with open(os.path.join(root, f"parity_rank{trainer.global_rank}.json"), "w") as f:
        json.dump(parity.state_dict(), f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
