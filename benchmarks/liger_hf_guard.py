"""Liger-patched Hugging Face causal LMs guarded by the same ``CEParityCallback()``, on one GPU, in bf16.

    python benchmarks/liger_hf_guard.py --out-md liger_hf.md      # needs CUDA, liger-kernel, transformers

For each model, Liger-Kernel's ``apply_liger_kernel_to_<model>`` replaces its forward with one that hands
``lm_head.weight`` to Liger's fused linear-CE (fp32 accumulation inside) and never materialises the logits.
The LightningModule returns the model's ``.loss`` unchanged; ``CEParityCallback(every_n_steps=1)`` records the
seam from the decoder's output. The table says how many checks were clean, that ``lm_head`` never ran (the
fused path was the one guarded), and each check's largest error/budget margin; a last row drops Falcon-H1's logit
multiplier (``ce_guard.testing.causal_lm_faults``) to show the same guard names it on the fused path.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

import lightning.pytorch as pl
import torch

from ce_guard.callbacks import CEParityCallback
from ce_guard.demos.hf_models import tiny_causal_lm
from ce_guard.receipt import read_receipts
from ce_guard.testing.causal_lm_faults import break_causal_lm

PATCHES = {"llama": "apply_liger_kernel_to_llama", "falcon_h1": "apply_liger_kernel_to_falcon_h1"}


class FineTune(pl.LightningModule):
    def __init__(self, architecture: str, vocab: int, hidden: int) -> None:
        super().__init__()
        self.model = tiny_causal_lm(architecture, vocab=vocab, hidden=hidden)

    def training_step(self, batch, batch_idx):
        labels = batch[0].clone()
        labels[:, :16] = -100
        return self.model(input_ids=batch[0], labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def run(architecture: str, *, steps: int, vocab: int, hidden: int, fault: str | None, root: str) -> dict:
    import liger_kernel.transformers as liger

    getattr(liger, PATCHES[architecture])()  # class-level: every model built afterwards runs Liger's forward
    module = FineTune(architecture, vocab, hidden)
    if fault:
        break_causal_lm(module.model, fault)
    head_calls = []
    module.model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(
        torch.randint(1, vocab, (4 * steps, 512), generator=gen)), batch_size=4)
    parity = CEParityCallback(every_n_steps=1, run_dir=root)
    trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=steps, logger=False,
                         callbacks=[parity], enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=root)
    started = time.perf_counter()
    trainer.fit(module, data)
    receipts = list(read_receipts(f"{root}/ce_guard/receipts.jsonl"))
    margins = [max(v for k, v in r["metrics"].items() if k.startswith("ce_parity/margin_") and v == v)
               for r in receipts]
    return {"model": type(module.model).__name__, "fault": fault or "none", "checks": len(parity.history),
            "variants": dict(Counter(h["variant"] for h in parity.history)), "missed": len(parity.missed),
            "lm_head_calls": len(head_calls), "max_margin": max(margins) if margins else None,
            "seconds": round(time.perf_counter() - started, 1),
            "contract": str(receipts[0]["seam"]["normalization"]) if receipts else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--root", default="runs/liger_hf")
    parser.add_argument("--out", default=None)
    parser.add_argument("--out-md", default=None)
    args = parser.parse_args()
    rows = []
    # Liger's forwards never call `loss_function`, so a patched loss function would not run; a multiplier the
    # forward reads does (Falcon-H1's lm_head_multiplier scales the hidden states handed to Liger's kernel).
    for architecture, faults in (("llama", (None,)), ("falcon_h1", (None, "dropped_logit_multiplier"))):
        for fault in faults:
            rows.append(run(architecture, steps=args.steps if fault is None else 1, vocab=args.vocab,
                            hidden=args.hidden, fault=fault, root=f"{args.root}/{architecture}_{fault or 'clean'}"))
            print(json.dumps(rows[-1]), flush=True)
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}",
             "| model (Liger-patched) | fault | checks | variants | missed | lm_head calls | max margin | s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['fault']} | {r['checks']} | {r['variants']} | {r['missed']} | {r['lm_head_calls']}"
              f" | {r['max_margin']:.3g} | {r['seconds']} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
