"""CEParityTrainerCallback in transformers' Trainer: a tiny Llama at gradient accumulation 4 with unequal padding,
clean under the Trainer's own weighting; the label smoother's accumulation bug named on the last release that has it
(run from a pinned copy in a subprocess) and clean on the installed one; a head that drops ``num_items_in_batch``
named at its first check; what cannot be guarded refused at train begin in one sentence."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch
import torch.nn.functional as F
from hf_trainer_driver import VOCAB, build
from packaging.version import Version
from pinned_files import PINNED_DIR, ROOT, pinned_or_skip
from transformers.modeling_outputs import CausalLMOutputWithPast

from ce_guard import SeamDriftError
from ce_guard.demos.hf_models import tiny_causal_lm
from ce_guard.seams import SeamRefused

PINNED = "5.14.1"  # the last release whose label smoother ignores num_items_in_batch (transformers issue 46731)
PINS = PINNED_DIR / f"transformers-{PINNED}"
INSTALL_PINS = ROOT / "tests" / "pins" / "install.sh"


def label_smoothing_variant(version: str) -> str:
    """What the guard names under label smoothing at accumulation 4, by transformers release. Up to 5.14.1 the Trainer
    hands ``num_items_in_batch`` to the model (which, without labels, computes no loss) but not to its label
    smoother, which divides by the micro-batch's own tokens, and then skips its divide by the accumulation because
    the model takes loss kwargs: each micro-batch weighs as a whole step, the loss and gradients about 4x too large.
    5.15 (transformers PR 47261) passes ``num_items_in_batch`` to the label smoother: every token of the window weighs
    alike, as the Trainer's contract says."""
    return "loss_scaled_outside/accumulation" if Version(version) < Version("5.15") else "within_budget/clean"


def logged(trainer, name: str) -> list[float]:
    return [entry[f"ce_parity/{name}"] for entry in trainer.state.log_history if f"ce_parity/{name}" in entry]


def test_a_tiny_llama_at_accumulation_4_is_clean_at_every_check(tmp_path):
    """The default path: the model takes loss kwargs, so the Trainer sums each micro-batch's loss over the window's
    counted tokens (num_items_in_batch) and skips its own divide; unequal padding weighs micro-batches unequally."""
    trainer, parity = build(str(tmp_path), steps=4)
    trainer.train()
    assert [h["variant"] for h in parity.history] == ["within_budget/clean"] * 4 and not parity.missed
    assert logged(trainer, "step_weight_factor") == pytest.approx([1.0] * 4, abs=1e-5)
    assert logged(trainer, "drift") == [0.0] * 4
    receipts = [json.loads(line) for line in (tmp_path / "ce_guard" / "receipts.jsonl").read_text().splitlines()]
    weights = [r["report"]["step_weight"] for r in receipts]
    assert [w["weighting"] for w in weights] == ["global_tokens"] * 4
    assert all(w["micro_batches"] == w["accumulate"] == 4 for w in weights)
    assert len({w["tokens"] for w in weights}) > 1  # a different micro-batch, of another size, each check


def test_label_smoothing_with_accumulation_on_the_installed_release(tmp_path):
    trainer, parity = build(str(tmp_path), label_smoothing=0.1)
    smoother = trainer.label_smoother
    trainer.train()
    expected = label_smoothing_variant(transformers.__version__)
    assert [h["variant"] for h in parity.history] == [expected] * 3 and not parity.missed
    assert trainer.label_smoother is smoother  # the wrap is gone after each check


def test_label_smoothing_with_accumulation_on_the_pinned_release(tmp_path):
    """Each check names the missing divide with its factor: the window's counted tokens over the recorded micro-batch's."""
    pinned_or_skip(PINS)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PINS), str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "hf_trainer_driver.py"), str(tmp_path),
                           "--label-smoothing", "0.1"], check=False, capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    assert run["transformers"] == PINNED
    variant = label_smoothing_variant(PINNED)
    assert [h["variant"] for h in run["history"]] == [variant] * 3 and not run["missed"]
    for entry in run["history"]:
        factor, tokens, window = re.search(r"([\d.]+)x heavier .* of 4 accumulated, (\d+) of (\d+) tokens",
                                           entry["summary"]).groups()
        assert float(factor) == pytest.approx(int(window) / int(tokens), rel=1e-3)
        assert "each of the window's 4 micro-batches weighed as a whole step" in entry["summary"]


class MeanHeadLlamaForCausalLM(transformers.LlamaForCausalLM):
    """A head whose forward takes ``**kwargs`` but computes its own mean, dropping ``num_items_in_batch``."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None if labels is None else F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits)


def mean_head(**attributes) -> MeanHeadLlamaForCausalLM:
    tiny = tiny_causal_lm("llama", vocab=VOCAB)
    head = type("MeanHeadLlamaForCausalLM", (MeanHeadLlamaForCausalLM,), attributes)(tiny.config)
    head.load_state_dict(tiny.state_dict())
    return head


def test_a_kwargs_head_that_drops_num_items_in_batch_is_named_with_its_factor(tmp_path):
    """transformers issue 47688 (open in 5.25.0): the Trainer reads ``**kwargs`` as "takes loss kwargs", passes
    ``num_items_in_batch`` and skips its divide by the accumulation; a head that ignores the count then trains about
    4x too heavy. The seam check names it: the head divides by its micro-batch's tokens where the call gave the
    window's count. A fix upstream that stops passing the count to heads that do not use it (asking them rather than
    reading ``**kwargs``) makes this head divide right and this check clean: the next test's head, which says so
    itself with ``accepts_loss_kwargs = False``."""
    trainer, parity = build(str(tmp_path), model=mean_head())
    with pytest.warns(UserWarning, match="CE seam drift at step 0 .* normalization_owner"):
        trainer.train()
    assert [h["variant"] for h in parity.history] == ["normalization_owner/token_count"] * 3
    for entry in parity.history:
        ratio, tokens, window = re.search(r"loss ratio ([\d.]+), .* non-ignored tokens \((\d+)\) where the contract"
                                          r" says the count given with the step .* \((\d+)\)", entry["summary"]).groups()
        assert float(ratio) == pytest.approx(int(window) / int(tokens), rel=1e-3) and int(window) > 2 * int(tokens)


def test_the_same_head_declaring_it_takes_no_loss_kwargs_is_clean(tmp_path):
    """Without the count the Trainer divides each micro-batch's mean by the accumulation: ``micro_batch_mean``."""
    trainer, parity = build(str(tmp_path), model=mean_head(accepts_loss_kwargs=False))
    trainer.train()
    assert [h["variant"] for h in parity.history] == ["within_budget/clean"] * 3 and not parity.missed


def test_policy_raise_ends_the_run_before_the_optimizer_step(tmp_path):
    trainer, _ = build(str(tmp_path), model=mean_head(), policy="raise")
    before = trainer.model.lm_head.weight.detach().clone()
    with pytest.raises(SeamDriftError, match="step 0 .* normalization_owner"):
        trainer.train()
    assert torch.equal(trainer.model.lm_head.weight, before)


class NotACausalLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.embed(input_ids))
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten())}


def test_a_model_that_is_not_a_causal_lm_is_refused_in_one_sentence(tmp_path):
    trainer, parity = build(str(tmp_path), model=NotACausalLM(), policy="raise", steps=1)
    with pytest.raises(SeamRefused, match=r"guards a transformers causal LM .* got NotACausalLM; train other models"):
        trainer.train()
    trainer, parity = build(str(tmp_path), model=NotACausalLM(), steps=1)
    with pytest.warns(UserWarning, match="so it is off for this run"):
        trainer.train()
    assert parity.history == [] and parity.missed == []


def test_label_smoothing_without_the_trainer_is_refused_with_the_fix(tmp_path):
    trainer, _ = build(str(tmp_path), label_smoothing=0.1, pass_trainer=False, policy="stop", steps=1)
    with pytest.raises(SeamRefused, match=r"label_smoothing_factor=0.1.*pass it: `callback ="
                                          r" CEParityTrainerCallback\(trainer=trainer\)`"):
        trainer.train()


def test_a_loss_computed_outside_the_model_is_a_missed_check_with_its_reason(tmp_path):
    """A ``compute_loss`` override that calls the model without labels: nothing to record, and the reason says why."""

    class OwnLoss(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            logits = model(**inputs).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    trainer, parity = build(str(tmp_path), steps=1, trainer_class=OwnLoss)
    with pytest.warns(UserWarning, match="the check at step 0 skipped: the model was called without labels"):
        trainer.train()
    assert parity.history == [] and [m["step"] for m in parity.missed] == [0]


def test_the_readme_and_ci_install_the_pinned_release_alike():
    command = "&& bash tests/pins/install.sh &&"
    assert command in (ROOT / "README.md").read_text() and command in (ROOT / ".ci" / "run").read_text()
    assert f"--target .pins/transformers-{PINNED} transformers=={PINNED}" in INSTALL_PINS.read_text()
