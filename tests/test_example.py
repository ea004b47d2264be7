"""examples/train_hybrid.py end to end on a tiny config: receipts, offline W&B files and the printed summary;
a fault config on top is flagged at the first check with its cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Tiny shapes on top of configs/cpu.yaml: the real 100352-token vocabulary, a 2-layer model, 3 steps.
TINY = """
trainer:
  max_steps: 3
  val_check_interval: 3
  limit_val_batches: 1
model:
  config: {d_model: 32, layer_pattern: "M*", n_heads: 2, n_kv_heads: 1, mamba_n_heads: 2, mamba_head_dim: 16,
           mamba_n_groups: 1, mamba_d_state: 16, mamba_chunk_size: 16, max_seq_len: 32}
  warmup_steps: 1
data: {seq_len: 32, batch_size: 2, max_tokens: 40000}
"""


def _train(tmp_path: Path, *configs: str) -> tuple[subprocess.CompletedProcess, Path]:
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY)
    args = [sys.executable, "examples/train_hybrid.py", "fit", "--config", "configs/cpu.yaml"]
    for config in (str(tiny), *configs):
        args += ["--config", config]
    args += [f"--trainer.default_root_dir={tmp_path / 'runs'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
             f"--data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "CE_GUARD_RUN_ID": "test", "WANDB_MODE": "offline", "COLUMNS": "200"}
    done = subprocess.run(args, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return done, tmp_path / "runs" / "test"


def _receipts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ce_guard" / "receipts.jsonl").read_text().splitlines()]


def test_clean_run_writes_receipts_wandb_files_and_the_summary(tmp_path) -> None:
    done, run_dir = _train(tmp_path)
    receipts = _receipts(run_dir)
    assert [(r["step"], r["drift"], r["cause"]) for r in receipts] == [(0, False, "within_budget")]
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1, list(run_dir.rglob("*"))
    out = done.stdout + done.stderr
    assert "ce_guard: 1 checks, 0 with drift, 0 missed." in out and "last verdict: step 0: clean (within_budget)" in out
    assert str(run_dir / "ce_guard" / "receipts.jsonl") in out and f"ce-guard report {run_dir}" in out
    assert "run summary" in done.stdout and "val/loss" in done.stdout and "W&B files" in done.stdout


def test_grad_scale_fault_is_flagged_at_the_first_check(tmp_path) -> None:
    done, run_dir = _train(tmp_path, "configs/faults/grad_scale.yaml")
    first = _receipts(run_dir)[0]
    assert (first["step"], first["drift"], first["cause"]) == (0, True, "normalization_scale")
    assert Path(first["bundle"]).is_file()
    assert "first drift: step 0 (rank 0): normalization_scale" in done.stderr


def test_a_doubled_training_loss_is_flagged_at_the_first_check(tmp_path) -> None:
    """The example's layer exact, its loss doubled on the way to backward: the training contract names it."""
    done, run_dir = _train(tmp_path, "configs/faults/doubled_loss.yaml")
    first = _receipts(run_dir)[0]
    assert (first["step"], first["drift"], first["variant"]) == (0, True, "loss_scaled_outside/factor")
    assert first["report"]["step_weight"]["factor"] == 2.0
    assert "first drift: step 0 (rank 0): loss_scaled_outside" in done.stderr
