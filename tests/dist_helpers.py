"""Spawn a few gloo processes on this machine, the way torchrun would, and collect what each returns."""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

# Ranks fork from a server that has imported torch, Lightning and ce_guard once (a fresh interpreter importing them
# takes 11-15 s for two ranks on two cores; a fork, 0.1 s). Like spawned ranks, they share no state with this
# process; unlike them, they see its environment as it was when the first ranks started (tests/conftest.py sets it
# at import). megatron-core is not preloaded: tests/megatron_pins.py points ranks at another version of it.
_PRELOAD = ["torch", "torch.distributed", "lightning.pytorch", "ce_guard", "ce_guard.callbacks", "dist_helpers"]
if "forkserver" in mp.get_all_start_methods():
    _CONTEXT = mp.get_context("forkserver")
    _CONTEXT.set_forkserver_preload(_PRELOAD)
else:
    _CONTEXT = mp.get_context("spawn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the child's traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return results in rank order.

    ``fn`` must be importable (module level). A child that raises fails the caller with its traceback;
    a child that hangs past ``timeout`` is killed, so a deadlock fails the test instead of stalling CI.
    """
    ctx = _CONTEXT
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue)) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed child failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
