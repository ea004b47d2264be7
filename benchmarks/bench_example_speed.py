"""Training speed of the example model with its kernel paths side by side, and their validation losses.

``speed`` (default): fits of the configured model with each variant's overrides, alternated ``--repeats``
times, no guard and no validation; each fit's mean step time over steps ``warmup..warmup+measure-1`` is the
window's wall time (device synchronised at its two ends). Reports the median over fits, tokens/s, the
model-FLOPs utilisation by 6 x parameters x tokens against ``--peak-tflops``, and the speed-up over the first
variant. ``--profile N`` then profiles N steps of the last variant that ran: top CUDA kernels and host ops,
the device's busy time against the wall time, and the host syncs of one more step.

    python benchmarks/bench_example_speed.py --config configs/gpu_1.yaml --variants torch fla --profile 3

``val``: the config's full run (``max_steps``, validation every ``val_check_interval``) per variant and seed
(``--model.seed`` and ``--data.seed``), and each validation loss; a kernel path is within run-to-run noise when
its losses differ from the plain path's by no more than the plain path's differ between seeds.

    python benchmarks/bench_example_speed.py val --config configs/gpu_1.yaml --variants torch fla --seeds 0 1
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from bench_guard_overhead import _ConfigCLI, device_label, fit_fresh, window_ms
from lightning.pytorch.callbacks import Callback
from torch.autograd import DeviceType

from ce_guard.demos.data import CppTokenDataModule
from ce_guard.demos.lit import HybridLitModule


def _variant(kernels: str, compile: bool = False, cuda_graphs: bool = False,
             mode: str = "default") -> list[str]:
    """Every switch set, so that a variant means the same whatever the config turns on."""
    return [f"--model.config.kernels={kernels}", f"--model.compile={str(compile).lower()}",
            f"--model.compile_mode={mode}", f"--model.cuda_graphs={str(cuda_graphs).lower()}"]


VARIANTS = {
    "torch": _variant("torch"),
    "fla": _variant("fla"),
    "torch_compile": _variant("torch", compile=True),
    "fla_compile": _variant("fla", compile=True),
    "fla_graphs": _variant("fla", compile=True, mode="reduce-overhead"),
    "fla_block_graphs": _variant("fla", cuda_graphs=True),
    "fla_compile_block_graphs": _variant("fla", compile=True, cuda_graphs=True),
}


def configured(args, overrides: list[str]) -> _ConfigCLI:
    return _ConfigCLI(HybridLitModule, CppTokenDataModule, run=False, save_config_callback=None,
                      args=["--config", args.config, *overrides, *args.overrides])


class KernelProfile(Callback):
    """torch.profiler over optimizer steps ``start..start+steps-1``, then one step under CUDA's sync debug mode.

    Reports the top CUDA kernels, the top host ops, the device's busy time against the wall time per step (a
    step the device idles through is bound by the host), and where the step waits for the device (host syncs).
    """

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.steps, self.report = start, steps, ""
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        self._profiler = torch.profiler.profile(activities=activities)
        self._wall = 0.0
        self._syncs: warnings.catch_warnings | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start:
            torch.cuda.synchronize()
            self._profiler.start()
            self._wall = time.perf_counter()
        elif trainer.global_step == self.start + self.steps:
            self._syncs = warnings.catch_warnings(record=True)
            self._sync_records = self._syncs.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.start + self.steps:
            torch.cuda.synchronize()
            wall_ms = 1e3 * (time.perf_counter() - self._wall) / self.steps
            self._profiler.stop()
            self.report = kernel_report(self._profiler.key_averages(), wall_ms, self.steps, "step")
        elif trainer.global_step == self.start + self.steps + 1 and self._syncs is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._syncs.__exit__(None, None, None)
            self.report += "\n" + sync_report(self._sync_records, "step")


def kernel_report(averages, wall_ms: float, runs: int, what: str) -> str:
    """The device's busy time against the wall time per ``what`` (over ``runs`` of it), then the top CUDA
    kernels and the top host ops of a torch.profiler's ``key_averages()``."""
    # Kernels and copies on the one stream (no overlap); a record_function range also has a device-side
    # annotation spanning its kernels, which would count them twice.
    kernels = [event for event in averages
               if event.device_type == DeviceType.CUDA and not event.is_user_annotation]
    busy_ms = sum(event.self_device_time_total for event in kernels) / 1e3 / runs
    return "\n".join([
        f"device busy {busy_ms:.1f} ms of {wall_ms:.1f} ms wall per {what} (profiled)",
        averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70),
        averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)])


def sync_report(records: list[warnings.WarningMessage], what: str) -> str:
    """Where one ``what`` waited for the device: the warnings CUDA's sync debug mode ("warn") recorded, by
    site."""
    sites = collections.Counter(f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:80]}"
                                for w in records if "synchroniz" in str(w.message))
    return (f"host syncs in one {what}: {sum(sites.values())}\n"
            + "".join(f"{n:4d} x {site}\n" for site, n in sites.most_common()))


def speed(args) -> dict:
    clis = {name: configured(args, VARIANTS[name]) for name in args.variants}
    data = clis[args.variants[0]].datamodule
    tokens_per_step = data.batch_size * data.seq_len
    step_ms: dict[str, list[float]] = {name: [] for name in args.variants}
    params = 0
    failed: dict[str, str] = {}
    for _ in range(args.repeats):
        for name, cli in clis.items():
            if name in failed:
                continue
            try:
                ms, module = window_ms(cli, args.warmup, args.measure, [])
            except Exception as error:  # noqa: BLE001 (a variant that cannot run here must not hide the others)
                failed[name] = f"{type(error).__name__}: {error}"[:500]
                print(f"{name}: failed: {failed[name]}", flush=True)
                continue
            params = sum(p.numel() for p in module.parameters())
            step_ms[name].append(ms)
            print(f"{name}: mean step {step_ms[name][-1]:.1f} ms", flush=True)
    base = statistics.median(step_ms[args.variants[0]])
    rows = [{"variant": name, "failed": error} for name, error in failed.items()]
    for name, runs in step_ms.items():
        if not runs:
            continue
        ms = statistics.median(runs)
        tokens_per_s = tokens_per_step / ms * 1e3
        rows.append({"variant": name, "step_ms": runs, "median_step_ms": ms, "tokens_per_s": tokens_per_s,
                     "mfu_pct": 100 * 6 * params * tokens_per_s / (args.peak_tflops * 1e12), "speedup": base / ms})
    device = device_label()
    print(f"\n{device}, {params / 1e6:.1f}M parameters, {tokens_per_step} tokens/step, steps "
          f"{args.warmup}..{args.warmup + args.measure - 1} timed, median of {args.repeats} alternated fits, "
          f"MFU by 6 x parameters x tokens / {args.peak_tflops:g} TFLOP/s")
    print(f"{'variant':>14} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7} {'speed-up':>9}")
    for row in rows:
        if "failed" in row:
            print(f"{row['variant']:>14} failed: {row['failed']}")
            continue
        print(f"{row['variant']:>14} {row['median_step_ms']:>9.1f} {row['tokens_per_s']:>10.0f} "
              f"{row['mfu_pct']:>6.1f}% {row['speedup']:>8.2f}x")
    result = {"device": device, "params": params, "tokens_per_step": tokens_per_step, "rows": rows}
    ran = [name for name in args.variants if step_ms[name]]
    if args.profile and ran:
        profile = KernelProfile(args.warmup, args.profile)
        fit_fresh(clis[ran[-1]], args.warmup + args.profile + 2, [profile])
        print(f"\nProfile, {args.profile} steps of {ran[-1]}:\n{profile.report}")
        result["profile"] = profile.report
    return result


class ValidationLosses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.losses[trainer.global_step] = float(trainer.callback_metrics["val/loss"])


def validation(args) -> dict:
    runs = []
    for seed in args.seeds:
        for name in args.variants:
            cli = configured(args, [*VARIANTS[name], f"--model.seed={seed}", f"--data.seed={seed}"])
            pl.seed_everything(seed)
            losses = ValidationLosses()
            trainer = cli.config.trainer
            fit_fresh(cli, trainer.max_steps, [losses], limit_val_batches=trainer.limit_val_batches,
                      val_check_interval=trainer.val_check_interval, check_val_every_n_epoch=None,
                      num_sanity_val_steps=0)
            runs.append({"variant": name, "seed": seed, "val_loss": losses.losses})
            print(f"{name} seed {seed}: " + ", ".join(f"step {s} {v:.4f}" for s, v in losses.losses.items()),
                  flush=True)
    by = {(run["variant"], run["seed"]): run["val_loss"] for run in runs}
    plain, steps = args.variants[0], sorted(runs[0]["val_loss"])
    print(f"\nvalidation loss: |variant - {plain}| at the same seed, against {plain}'s spread over seeds")
    summary = {}
    for step in steps:
        noise = max(by[plain, s][step] for s in args.seeds) - min(by[plain, s][step] for s in args.seeds)
        for name in args.variants[1:]:
            gap = max(abs(by[name, s][step] - by[plain, s][step]) for s in args.seeds)
            summary[f"{name}@{step}"] = {"max_gap": gap, "seed_spread": noise}
            print(f"  step {step}: {name} max gap {gap:.4f}, {plain} seed spread {noise:.4f}")
    return {"runs": runs, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="speed", choices=("speed", "val"))
    parser.add_argument("--config", default="configs/gpu_1.yaml")
    parser.add_argument("--variants", nargs="+", default=["torch", "fla"], choices=sorted(VARIANTS),
                        help="the first is the baseline")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--measure", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--profile", type=int, default=0, help="speed: profile this many steps of the last variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", help="write the results as JSON here")
    args, args.overrides = parser.parse_known_args()
    result = speed(args) if args.mode == "speed" else validation(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"mode": args.mode, "config": args.config, "overrides": args.overrides, **result}, f, indent=2)


if __name__ == "__main__":
    main()
