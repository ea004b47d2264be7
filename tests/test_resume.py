"""SIGKILL a training run between checkpoints, resume from the last one: schedule, receipts, history, W&B run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ce_guard.receipt import read_receipts

JOB = str(Path(__file__).with_name("resume_job.py"))


def _receipt_steps(path: Path) -> list[int]:
    return [r["step"] for r in read_receipts(path)] if path.exists() else []


def _newest_loadable_checkpoint(folder: Path) -> Path:
    for ckpt in sorted(folder.glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]), reverse=True):
        try:
            torch.load(ckpt, weights_only=False, map_location="cpu")
            return ckpt
        except Exception:  # noqa: BLE001 - a checkpoint torn by the kill is not a resume point
            continue
    raise AssertionError(f"no loadable checkpoint in {folder}")


def test_sigkill_then_resume_continues_the_schedule_without_duplicate_receipts(tmp_path):
    receipts = tmp_path / "ce_guard" / "receipts.jsonl"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    job = subprocess.Popen([sys.executable, JOB, str(tmp_path), "40"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    # Checkpoints land after steps 1, 3, 5, 7...; the receipt of step 8 comes one slow step before the next
    # checkpoint, so killing then loses the checks after the last checkpoint.
    while len(_receipt_steps(receipts)) < 9 and time.time() < deadline and job.poll() is None:
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    before = _receipt_steps(receipts)
    assert len(before) >= 9 and before == list(range(len(before))), before

    ckpt = _newest_loadable_checkpoint(tmp_path / "ckpt")
    assert int(ckpt.stem.split("=")[1]) <= before[-1] + 1  # steps after the checkpoint run, and are checked, again
    done = subprocess.run([sys.executable, JOB, str(tmp_path), "14", str(ckpt)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # Every step checked exactly once: the lost steps' receipts were replaced by the re-run's.
    assert _receipt_steps(receipts) == list(range(14))
    final = torch.load(tmp_path / "ckpt" / "step=14.ckpt", weights_only=False, map_location="cpu")
    state = next(v for k, v in final["callbacks"].items() if k.startswith("CEParityCallback"))
    assert [h["step"] for h in state["history"]] == list(range(14)) and state["last_checked_step"] == 13
    # The W&B run resumed under the same id: both offline run folders belong to it.
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith("-resume-test") for name in runs), runs
