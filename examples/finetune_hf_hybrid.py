"""Fine-tune a tiny Hugging Face hybrid Mamba model on C++ text, guarded by ``CEParityCallback()`` alone.

    python examples/finetune_hf_hybrid.py                                    # Bamba, clean, ~2 min on 2 cores
    python examples/finetune_hf_hybrid.py --architecture falcon_h1 --fault dropped_logit_multiplier
    python examples/finetune_hf_hybrid.py --architecture zamba2 --fault ignore_in_denominator --fault-step 30

The model is a transformers ``*ForCausalLM`` built from a config with random weights (nothing is downloaded;
its Mamba layers take transformers' PyTorch fallback on CPU); the tokens are torch's C++ headers, as in
``train_hybrid.py``. The LightningModule returns the model's own ``.loss``: the guard finds the model, reads the
contract from its config and the call, and records the seam from the decoder's output to that loss. A fault
(``--fault``) breaks the model's own loss code from ``--fault-step`` on; the guard names it at the next check.
Needs ``pip install -e '.[example,transformers]'``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch

from ce_guard.callbacks import CEParityCallback
from ce_guard.demos.data import CppTokenDataModule
from ce_guard.demos.hf_models import ARCHITECTURES, tiny_causal_lm
from ce_guard.demos.inject import InjectCausalLMFault
from ce_guard.testing.causal_lm_faults import CAUSAL_LM_FAULTS


class CausalLMFineTune(pl.LightningModule):
    """What a user writes around a Hugging Face model; nothing here knows about the guard."""

    def __init__(self, architecture: str, vocab_size: int, lr: float = 3e-3) -> None:
        super().__init__()
        self.model = tiny_causal_lm(architecture, vocab=vocab_size, hidden=64)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        input_ids, targets = batch  # targets are already the next tokens: transformers' `shift_labels`
        loss = self.model(input_ids=input_ids, labels=targets, shift_labels=targets).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1)


def main(argv: list[str] | None = None) -> CEParityCallback:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--architecture", default="bamba", choices=ARCHITECTURES)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every-n-steps", type=int, default=10, help="check the seam this often")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--fault", choices=CAUSAL_LM_FAULTS, help="break the model's own loss code")
    parser.add_argument("--fault-step", type=int, default=25)
    parser.add_argument("--root-dir", default="runs/hf_hybrid")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    data = CppTokenDataModule(seq_len=64, batch_size=4, max_tokens=200_000, pad_fraction=0.1)
    parity = CEParityCallback(every_n_steps=args.every_n_steps)
    callbacks = [parity] + ([InjectCausalLMFault(args.fault_step, args.fault)] if args.fault else [])
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, precision=args.precision,
                         callbacks=callbacks, logger=False, enable_checkpointing=False, gradient_clip_val=1.0,
                         default_root_dir=args.root_dir, limit_val_batches=0, log_every_n_steps=10)
    trainer.fit(CausalLMFineTune(args.architecture, data.vocab_size), data)
    return parity


if __name__ == "__main__":
    main()
