"""Does a generic spike detector notice a seam fault? The guard against Lightning's SpikeDetection.

The example hybrid model trains on the C++ corpus; at ``--switch-step`` its output layer starts computing
one seam fault (same weight, same optimizer). Three watchers run side by side for ``--steps`` steps:
CEParityCallback (every ``--every`` steps), Lightning's ``SpikeDetection`` (loss above ``rtol`` x its
running mean), and SeamHealthCallback's z-score rule on loss and gradient norm.
Each reports the first step it fires after the switch, if any.

    python benchmarks/spike_vs_guard.py --out runs/spike_vs_guard.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import SpikeDetection

from ce_guard.callbacks import CEParityCallback, SeamHealthCallback
from ce_guard.demos.data import CppTokenDataModule
from ce_guard.demos.hybrid import HybridConfig
from ce_guard.demos.inject import InjectSeamFault
from ce_guard.demos.kernels import KERNELS
from ce_guard.demos.lit import HybridLitModule

FAULTS = {  # fault -> extra contract options it needs to have something to break
    "grad_scale": {},
    "bf16_accumulators": {},
    "ignore_in_denominator": {},
    "missing_z_loss": {"z_loss": 1e-4},
}


class RecordingSpikeDetection(SpikeDetection):
    """Lightning's SpikeDetection, recording the steps it would have stopped at instead of stopping."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fired: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        except Exception:  # noqa: BLE001 - TrainingSpikeException: note it and keep training
            self.fired.append(trainer.global_step)


def run(fault: str, args) -> dict:
    pl.seed_everything(0)
    # Padded rows, so that a fault in the handling of ignored tokens has something to get wrong.
    data = CppTokenDataModule(seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                              pad_fraction=args.pad_fraction)
    config = HybridConfig(vocab_size=data.vocab_size, d_model=args.d_model, layer_pattern="M*M-", n_heads=4,
                          n_kv_heads=2, mamba_n_heads=4, mamba_head_dim=args.d_model // 2,
                          mamba_n_groups=2, mamba_d_state=32, max_seq_len=args.seq_len, kernels=args.kernels)
    module = HybridLitModule(config, token_chunk=256, **FAULTS[fault])
    # Every drifting check writes a repro bundle (the weight included: ~200 MB at d_model 256), so the run
    # dir can be kept apart from the results that get shipped.
    run_dir = Path(args.run_dir or Path(args.out).parent) / fault
    # The fixed schedule (no faster checks after a drift, no checks on spikes): every watcher sees the same run.
    parity = CEParityCallback(every_n_steps=args.every, every_n_steps_while_drifting=None, run_dir=str(run_dir))
    health = SeamHealthCallback(warmup=20, check_on_spike=False)
    spike = RecordingSpikeDetection(warmup=20)
    trainer = pl.Trainer(max_steps=args.steps, accelerator=args.accelerator, devices=1, logger=False,
                         callbacks=[InjectSeamFault(args.switch_step, fault), parity, health, spike],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, precision=args.precision)
    started = time.time()
    trainer.fit(module, datamodule=data)
    first = lambda steps: next((s for s in steps if s >= args.switch_step), None)
    return {
        "fault": fault,
        "guard_first_flag": first([h["step"] for h in parity.history if h["drift"]]),
        "guard_cause": next((h["cause"] for h in parity.history if h["drift"]), None),
        "guard_clean_before_switch": all(not h["drift"] for h in parity.history if h["step"] < args.switch_step),
        "guard_checks": [[h["step"], h["cause"]] for h in parity.history],
        "spike_detection_first": first(spike.fired),
        "zscore_first": first([s["step"] for s in health.spikes]),
        "seconds": time.time() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", nargs="+", default=list(FAULTS), choices=list(FAULTS))
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--switch-step", type=int, default=100)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=400_000)
    parser.add_argument("--pad-fraction", type=float, default=0.1)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--kernels", default="torch", choices=KERNELS,
                        help="the Mamba scan's kernels; plain PyTorch by default, as the recorded runs (fla autotunes"
                             " for minutes on a fresh machine)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--run-dir", default=None, help="receipts and repro bundles (default: beside --out)")
    args = parser.parse_args()
    results = []
    for fault in args.faults:
        results.append(run(fault, args))
        print(json.dumps(results[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "switch_step": args.switch_step,
                                          "every": args.every, "results": results}, indent=1))


if __name__ == "__main__":
    main()
