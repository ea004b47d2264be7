"""SIGKILL a training job between checkpoints, resume from the last one: schedule, receipts, history, W&B run.

The job runs as one process, and as two DDP ranks over gloo launched the way torchrun launches them.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dist_helpers import free_port

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


def _logs(root: Path) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(root.glob("rank*.log")))


@contextlib.contextmanager
def _job(root: Path, max_steps: int, world_size: int,
         ckpt: Path | None = None) -> Iterator[list[subprocess.Popen]]:
    """Start the job's ranks, as torchrun would, in one new process group: one SIGKILL ends the whole job, and
    no rank outlives the test whatever happens."""
    command = [sys.executable, JOB, str(root), str(max_steps)] + ([str(ckpt)] if ckpt else [])
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    if world_size > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size))
    ranks: list[subprocess.Popen] = []
    for rank in range(world_size):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)} if world_size > 1 else env
        with open(root / f"rank{rank}.log", "a") as log:
            ranks.append(subprocess.Popen(command, env=rank_env, stdout=log, stderr=subprocess.STDOUT,
                                          process_group=ranks[0].pid if ranks else 0))
    try:
        yield ranks
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(ranks[0].pid, signal.SIGKILL)
        for proc in ranks:
            proc.wait(timeout=30)


def _wait_for_exit(ranks: list[subprocess.Popen], root: Path, timeout: float) -> None:
    """Every rank exits cleanly within ``timeout``: a rank left waiting on a collective fails the test."""
    deadline = time.monotonic() + timeout
    for rank, proc in enumerate(ranks):
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"rank {rank} still running after {timeout} s\n{_logs(root)}") from None
    assert [proc.returncode for proc in ranks] == [0] * len(ranks), _logs(root)


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.distributed)],
                         ids=["one_process", "gloo_dp2"])
def test_sigkill_then_resume_continues_the_schedule_without_duplicate_receipts(tmp_path, world_size):
    receipts = tmp_path / "ce_guard" / "receipts.jsonl"
    with _job(tmp_path, 40, world_size) as ranks:
        deadline = time.monotonic() + 120
        # Checkpoints land after steps 1, 3, 5, 7...; the receipt of step 8 comes one slow step before the
        # next checkpoint, so killing then loses the checks after the last checkpoint.
        while len(_receipt_steps(receipts)) < 9 and time.monotonic() < deadline:
            assert all(proc.poll() is None for proc in ranks), _logs(tmp_path)
            time.sleep(0.02)
        os.killpg(ranks[0].pid, signal.SIGKILL)  # every rank at once
    before = _receipt_steps(receipts)
    assert len(before) >= 9 and before == list(range(len(before))), before

    ckpt = _newest_loadable_checkpoint(tmp_path / "ckpt")
    # The steps after the checkpoint run, and are checked, again.
    assert int(ckpt.stem.split("=")[1]) <= before[-1] + 1
    with _job(tmp_path, 14, world_size, ckpt) as ranks:
        _wait_for_exit(ranks, tmp_path, timeout=120)

    # Every step checked exactly once, by every rank: the lost steps' receipts were replaced by the re-run's.
    # Rank zero alone writes receipts; each one carries the verdict every rank agreed on.
    assert list(tmp_path.rglob("receipts.jsonl")) == [receipts]
    final_receipts = list(read_receipts(receipts))
    assert [r["step"] for r in final_receipts] == list(range(14))
    assert [(r["ranks"], r["drifting_ranks"]) for r in final_receipts] == [(world_size, 0)] * 14
    final = torch.load(tmp_path / "ckpt" / "step=14.ckpt", weights_only=False, map_location="cpu")
    saved = next(v for k, v in final["callbacks"].items() if k.startswith("CEParityCallback"))
    assert [h["step"] for h in saved["history"]] == list(range(14)) and saved["last_checked_step"] == 13
    # The checkpoint holds rank zero's history; every rank restored it and went on from it.
    for rank in range(world_size):
        state = json.loads((tmp_path / f"parity_rank{rank}.json").read_text())
        assert state["history"] == saved["history"] and state["last_checked_step"] == 13, rank
    # The W&B run resumed under the same id: both offline run folders belong to it.
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith("-resume-test") for name in runs), runs
