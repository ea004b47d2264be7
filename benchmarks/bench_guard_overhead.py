"""Training-step time of the hybrid demo with and without ``CEParityCallback``, and the guard's amortised cost.

Fits of the same model and data, each ``warmup + measure`` optimizer steps: no guard, a check every
100 steps and a check every 50, alternated ``--repeats`` times. A step's time is the interval between
consecutive ``on_train_batch_end`` hooks (CUDA synchronised), so it holds data loading, forward, backward,
the optimizer and, on a check step, the check. With ``measure=100`` and ``warmup=10`` the timed window
(steps 10..109) holds exactly the checks its rate implies (100; 50 and 100), so the median window mean's
excess over the unguarded fits is the amortised overhead. Where fits differ from each other by more than a
check costs (a step bound by the host varies a few percent from fit to fit), that comparison reads noise; the
paired estimate does not: each check step's time less the median ordinary step of the same fit, amortised over
``every`` steps of the unguarded median step. (It leaves out any cost the guard adds to ordinary steps; the
medians of the guarded and unguarded fits show that.)

    python benchmarks/bench_guard_overhead.py --config configs/gpu_1.yaml           # GPU
    python benchmarks/bench_guard_overhead.py --quick                               # CPU, tiny, ~1 min

``--monitor`` times ``SeamHealthCallback`` instead: fits with and without it, alternated ``--repeats`` times,
both with the parity callback present but no check in the window and the config's gradient clipping. Each
fit's mean step time is its window's wall time, synchronised at the window's two ends only, so a host
synchronisation the monitor adds on ordinary steps shows up as lost overlap; the host time of each of the
monitor's per-step hooks (median over the window; the wait for the last step's values is in
``on_train_batch_start``) is printed beside it.

    python benchmarks/bench_guard_overhead.py --config configs/gpu_1.yaml --monitor --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI

from ce_guard.callbacks import CEParityCallback, SeamHealthCallback
from ce_guard.demos.data import CppTokenDataModule
from ce_guard.demos.lit import HybridLitModule

QUICK = ["--config", "configs/cpu.yaml", "--model.config.d_model=64", "--model.config.layer_pattern=M*",
         "--data.seq_len=64", "--data.batch_size=4", "--data.max_tokens=200000"]


class StepTimer(Callback):
    """Seconds of each training step, end to end (place it last, after the guard)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None:
            self.seconds.append(now - self._last)
        self._last = now


class WindowTimer(Callback):
    """Wall time of optimizer steps ``start..`` to the end of the fit, the device synchronised at both ends."""

    def __init__(self, start: int) -> None:
        self.start, self.seconds, self.steps = start, None, 0
        self._began: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.start and self._began is None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize()
            self._began = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds, self.steps = time.perf_counter() - self._began, trainer.global_step - self.start


class _ConfigCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")


def time_fit(cli: LightningCLI, every_n_steps: int | None, steps: int) -> tuple[list[float], int]:
    """One fit of a fresh copy of the configured model: per-step seconds (from the second step on), parameters."""
    timer = StepTimer()
    guard = [] if every_n_steps is None else [CEParityCallback(every_n_steps=every_n_steps)]
    module = fit_fresh(cli, steps, [*guard, timer])
    return timer.seconds, sum(p.numel() for p in module.parameters())


def fit_fresh(cli: LightningCLI, steps: int, callbacks: list[Callback], **trainer_args) -> pl.LightningModule:
    """Fit a fresh copy of the configured model for ``steps`` on one device, nothing but ``callbacks`` extra
    (no validation and no logger unless ``trainer_args`` ask for them; the config's gradient clipping)."""
    trainer_args = {"limit_val_batches": 0, "logger": False,
                    "gradient_clip_val": cli.config.trainer.gradient_clip_val, **trainer_args}
    trainer = pl.Trainer(accelerator=cli.config.trainer.accelerator, devices=1, precision=cli.config.trainer.precision,
                         max_steps=steps, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks,
                         default_root_dir="runs/bench_guard_overhead", **trainer_args)
    module = copy.deepcopy(cli.model)  # not built yet (configure_model runs in fit): a cheap, fresh copy
    torch._dynamo.reset()  # a compiled model starts from no graphs (an earlier fit's CUDA graphs break its capture)
    trainer.fit(module, datamodule=cli.datamodule)
    return module


class TimedHealth(SeamHealthCallback):
    """SeamHealthCallback with the host time of each of its per-step hooks recorded (no device sync added)."""

    HOOKS = ("on_train_batch_start", "on_before_backward", "on_before_optimizer_step", "_send")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.host_ms: dict[str, list[float]] = {name: [] for name in self.HOOKS}
        for name in self.HOOKS:
            setattr(self, name, self._timed(name, getattr(self, name)))

    def _timed(self, name, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.host_ms[name].append(1e3 * (time.perf_counter() - started))
        return timed


def window_ms(cli: LightningCLI, warmup: int, measure: int, callbacks: list[Callback],
              **trainer_args) -> tuple[float, pl.LightningModule]:
    """Mean milliseconds per step of one fresh fit over steps warmup..warmup+measure-1 (``WindowTimer``), and
    the fitted module."""
    timer = WindowTimer(warmup)
    module = fit_fresh(cli, warmup + measure, [*callbacks, timer], **trainer_args)
    return 1e3 * timer.seconds / timer.steps, module


def device_label() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"


def time_monitor(cli: LightningCLI, monitor: bool, warmup: int, measure: int) -> tuple[float, int, dict]:
    """Mean step milliseconds of one fit over steps warmup..warmup+measure-1, the spikes the monitor called, and
    the median host milliseconds of each of its hooks."""
    health = [TimedHealth()] if monitor else []
    step_ms, _ = window_ms(cli, warmup, measure, [CEParityCallback(every_n_steps=10 ** 9), *health])
    hooks = {name: statistics.median(ms[warmup:]) for h in health for name, ms in h.host_ms.items() if ms[warmup:]}
    return step_ms, sum(len(h.spikes) for h in health), hooks


def monitor_cost(cli: LightningCLI, args) -> dict:
    runs = {"off": [], "on": []}
    spikes, hook_ms = 0, {}
    for _ in range(args.repeats):
        for state in ("off", "on"):
            ms, called, hooks = time_monitor(cli, state == "on", args.warmup, args.measure)
            runs[state].append(ms)
            spikes += called
            hook_ms = hook_ms or hooks
            print(f"monitor {state}: mean step {runs[state][-1]:.2f} ms"
                  + "".join(f", {name} {ms:.3f} ms" for name, ms in hooks.items()), flush=True)
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    print(f"\nSeamHealthCallback: median step {on:.2f} ms with, {off:.2f} ms without: {100 * (on / off - 1):+.2f}%"
          f" ({args.repeats} fits each, alternated; {spikes} spikes called in the windows)")
    return {"step_ms": runs, "median_off_ms": off, "median_on_ms": on, "cost_pct": 100 * (on / off - 1),
            "hook_host_ms_first_fit": hook_ms,
            "spikes_in_windows": spikes, "gradient_clip_val": cli.config.trainer.gradient_clip_val}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpu_1.yaml", help="an example config: model, data, precision")
    parser.add_argument("--quick", action="store_true", help="tiny model on CPU (configs/cpu.yaml shrunk)")
    parser.add_argument("--warmup", type=int, default=10, help="steps not timed")
    parser.add_argument("--measure", type=int, default=100, help="timed steps; a multiple of 100 keeps rates exact")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--monitor", action="store_true", help="time SeamHealthCallback instead of the checks")
    parser.add_argument("--repeats", type=int, default=3, help="fits of each kind, alternated")
    args, overrides = parser.parse_known_args()
    cli_args = [*(QUICK if args.quick else ["--config", args.config]), *overrides]
    cli = _ConfigCLI(HybridLitModule, CppTokenDataModule, run=False, args=cli_args, save_config_callback=None)
    tokens_per_step = cli.datamodule.batch_size * cli.datamodule.seq_len
    if args.monitor:
        result = monitor_cost(cli, args)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"device": device_label(),
                           "precision": cli.config.trainer.precision, "tokens_per_step": tokens_per_step,
                           **result}, f, indent=2)
        return

    rows, n_params = checks_cost(cli, args)
    device = device_label()
    print(f"\n{device}, {n_params / 1e6:.1f}M parameters, precision {cli.config.trainer.precision}, "
          f"{tokens_per_step} tokens/step, steps {args.warmup}..{args.warmup + args.measure - 1} timed, "
          f"median of {args.repeats} alternated fits")
    print(f"{'guard':>10} {'checks':>6} {'mean ms':>9} {'median ms':>9} {'max ms':>9} {'tokens/s':>10} "
          f"{'overhead':>8} {'per check':>10} {'paired: per check':>18} {'amortised':>9}")
    for row in rows:
        row["tokens_per_s"] = tokens_per_step / row["mean_step_ms"] * 1e3
        check = f"{row['check_ms']:.0f} ms" if "check_ms" in row else "-"
        paired = f"{row['check_ms_paired']:.1f} ms" if "check_ms_paired" in row else "-"
        amortised = f"{row['amortised_pct_paired']:.2f}%" if "amortised_pct_paired" in row else "-"
        print(f"{row['guard']:>10} {row['checks_timed']:>6} {row['mean_step_ms']:>9.1f} {row['median_step_ms']:>9.1f} "
              f"{row['max_step_ms']:>9.1f} {row['tokens_per_s']:>10.0f} {row['overhead_pct']:>7.2f}% {check:>10} "
              f"{paired:>18} {amortised:>9}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device, "params": n_params, "precision": cli.config.trainer.precision,
                       "tokens_per_step": tokens_per_step, "repeats": args.repeats, "rows": rows}, f, indent=2)


def checks_cost(cli: LightningCLI, args) -> tuple[list[dict], int]:
    """Fits with no guard, a check every 100 and every 50 steps, alternated ``args.repeats`` times; each row
    holds the median over its fits of the window's mean step time, and the overhead against no guard."""
    # The timer sees intervals after the first step; keep steps warmup..warmup+measure-1 (batch indices).
    window = slice(args.warmup - 1, args.warmup - 1 + args.measure)
    rates = (None, 100, 50)
    fits: dict[int | None, list[list[float]]] = {every: [] for every in rates}
    for _ in range(args.repeats):
        for every in rates:
            seconds, n_params = time_fit(cli, every, args.warmup + args.measure)
            fits[every].append(seconds[window])
            print(f"guard {'off' if every is None else f'every {every}'}: mean step "
                  f"{1e3 * statistics.fmean(seconds[window]):.1f} ms", flush=True)
    rows = []
    batches = range(args.warmup, args.warmup + args.measure)
    for every, runs in fits.items():
        means = [1e3 * statistics.fmean(seconds) for seconds in runs]
        rows.append({"guard": "off" if every is None else f"every {every}",
                     "checks_timed": sum(1 for step in batches if every and step % every == 0),
                     "mean_step_ms": statistics.median(means), "fit_mean_step_ms": means,
                     "median_step_ms": statistics.median(1e3 * s for seconds in runs for s in seconds),
                     "max_step_ms": 1e3 * max(s for seconds in runs for s in seconds),
                     "step_ms": [[round(1e3 * s, 3) for s in seconds] for seconds in runs]})
    base, base_median = rows[0]["mean_step_ms"], rows[0]["median_step_ms"]
    for every, row in zip(fits, rows):
        row["overhead_pct"] = 100 * (row["mean_step_ms"] / base - 1)
        if row["checks_timed"]:  # one check's cost: the window's excess time over its checks
            row["check_ms"] = (row["mean_step_ms"] - base) * args.measure / row["checks_timed"]
            row["check_ms_paired"] = statistics.median(_check_excess_ms(seconds, batches, every)
                                                       for seconds in fits[every])
            row["amortised_pct_paired"] = 100 * row["check_ms_paired"] / (every * base_median)
    return rows, n_params


def _check_excess_ms(seconds: list[float], batches: range, every: int) -> float:
    """Mean milliseconds of the fit's check steps (batch index a multiple of ``every``; the timer runs after the
    check) beyond the median of its other steps."""
    checks = [s for batch, s in zip(batches, seconds) if batch % every == 0]
    ordinary = [s for batch, s in zip(batches, seconds) if batch % every]
    return 1e3 * (statistics.fmean(checks) - statistics.median(ordinary))


if __name__ == "__main__":
    main()
