"""A tiny Llama under transformers' ``Trainer`` with ``CEParityTrainerCallback``: what tests/test_hf_trainer.py runs in
process (the installed transformers) and, as a script, under a pinned release::

    PYTHONPATH=.pins/transformers-5.14.1:. python tests/hf_trainer_driver.py OUT_DIR --label-smoothing 0.1

prints, as its last line, one JSON object: the transformers version, the callback's history and missed checks.
Random weights from a config, data made here: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
import transformers
from torch.utils.data import Dataset

from ce_guard.demos.hf_models import tiny_causal_lm
from ce_guard.hf_trainer import CEParityTrainerCallback

VOCAB, SEQ = 128, 16


class PaddedTokens(Dataset):
    """Row i ignores its first (i * 5) % 11 labels (a prompt): micro-batches count unequal tokens."""

    def __init__(self, rows: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(1, VOCAB, (rows, SEQ), generator=gen)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        labels = self.input_ids[i].clone()
        labels[: (i * 5) % 11] = -100
        return {"input_ids": self.input_ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": labels}


def build(output_dir: str, *, model: Any = None, label_smoothing: float = 0.0, accumulate: int = 4, steps: int = 3,
          pass_trainer: bool = True, trainer_class: type = transformers.Trainer,
          **callback_args: Any) -> tuple[transformers.Trainer, CEParityTrainerCallback]:
    """A ``trainer_class`` over a tiny Llama (or ``model``) with the guard checking every step; ``train()`` runs it."""
    args = transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=2, gradient_accumulation_steps=accumulate,
        max_steps=steps, learning_rate=1e-3, label_smoothing_factor=label_smoothing, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0)
    model = model if model is not None else tiny_causal_lm("llama", vocab=VOCAB)
    trainer = trainer_class(model=model, args=args, train_dataset=PaddedTokens(2 * accumulate * steps))
    callback = CEParityTrainerCallback(every_n_steps=1, trainer=trainer if pass_trainer else None, **callback_args)
    trainer.add_callback(callback)
    return trainer, callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    options = parser.parse_args()
    trainer, callback = build(options.output_dir, label_smoothing=options.label_smoothing,
                              accumulate=options.accumulate, steps=options.steps)
    trainer.train()
    print(json.dumps({"transformers": transformers.__version__, "history": callback.history,
                      "missed": callback.missed}))


if __name__ == "__main__":
    main()
