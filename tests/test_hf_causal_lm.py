"""Hugging Face causal LMs guarded unchanged by ``CEParityCallback()`` alone: every hybrid Mamba model
transformers ships that runs on CPU, Llama, and the heads that transform their logits; clean over 20 checks in
fp32 and under bf16 autocast, and a fault in the model's own loss code named at its first check."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lightning.pytorch as pl
from lightning_helpers import trainer
from torch.utils.data import DataLoader, TensorDataset

from ce_guard.callbacks import CEParityCallback
from ce_guard.demos.hf_models import ARCHITECTURES, tiny_causal_lm
from ce_guard.demos.inject import InjectCausalLMFault
from ce_guard.seams.causal_lm import CausalLMSeam, causal_lm_contract
from ce_guard.testing import INJECTIONS

VOCAB = 512


class HFModule(pl.LightningModule):
    """What a user writes around an HF model: ``return self.model(input_ids, labels=labels).loss``."""

    def __init__(self, architecture: str, num_items: bool = False, **overrides) -> None:
        super().__init__()
        self.model = tiny_causal_lm(architecture, vocab=VOCAB, **overrides)
        self.num_items = num_items

    def training_step(self, batch, batch_idx):
        (input_ids,) = batch
        labels = input_ids.clone()
        labels[:, :5] = -100  # a prompt the loss ignores
        extra = {"num_items_in_batch": 2 * int((labels[:, 1:] != -100).sum())} if self.num_items else {}
        return self.model(input_ids=input_ids, labels=labels, **extra).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def loader(batches: int = 20) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(1, VOCAB, (2 * batches, 24), generator=gen)), batch_size=2)


def fit(tmp_path, module, *, steps: int, precision: str = "32-true", faults=(), **callback_args) -> CEParityCallback:
    parity = CEParityCallback(every_n_steps=1, **callback_args)
    t, _ = trainer(tmp_path, [parity, *faults], max_steps=steps, precision=precision)
    t.fit(module, loader(steps))
    return parity


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_clean_over_20_checks(tmp_path, architecture, precision):
    # Twice this batch's count as num_items_in_batch holds the seam to a given count; the step then weighs half
    # what one micro-batch's window says, so the training contract is left out here (tests/test_step_weight.py).
    num_items = architecture in ("llama", "bamba")
    parity = fit(tmp_path, HFModule(architecture, num_items=num_items), steps=20, precision=precision,
                 training_contract=None if num_items else "auto")
    assert [h["variant"] for h in parity.history] == ["within_budget/clean"] * 20 and not parity.missed


def test_the_contract_comes_from_the_config():
    contracts = {a: causal_lm_contract(tiny_causal_lm(a, vocab=VOCAB)) for a in ARCHITECTURES}
    assert {a: c.logit_multiplier for a, c in contracts.items() if c.logit_multiplier != 1} == {
        "falcon_h1": 0.5, "cohere": 0.0625, "granite": 0.25, "granitemoehybrid": 0.25}
    assert {a: c.softcap for a, c in contracts.items() if c.softcap} == {"gemma2": 30.0}
    assert (contracts["bamba"].z_loss, contracts["bamba"].z_loss_positions) == (0.01, "all")
    assert all(c.vocab_size == VOCAB and c.ignore_index == -100 for c in contracts.values())


FAULTS = [(row, architecture) for row in INJECTIONS for architecture in row.causal_lm]


@pytest.mark.parametrize("row, architecture", FAULTS, ids=[f"{r.switch}-{a}" for r, a in FAULTS])
def test_a_fault_in_the_models_loss_code_is_named_at_the_first_check(tmp_path, row, architecture):
    """Injected at step 0, after the guard read the contract from the config at fit start."""
    with pytest.warns(UserWarning, match="CE seam drift at step 0"):
        parity = fit(tmp_path, HFModule(architecture), steps=1, faults=[InjectCausalLMFault(0, row.switch)])
    assert parity.history[0]["variant"] == row.variants["float32"]


def test_a_call_without_labels_is_not_the_seam_and_never_breaks_the_forward(tmp_path):
    """Evaluation or generation in the training step: the model's other calls pass through untouched."""
    class WithGeneration(HFModule):
        def training_step(self, batch, batch_idx):
            self.model(input_ids=batch[0][:, :4])  # no labels: no loss, not recorded
            return super().training_step(batch, batch_idx)

    parity = fit(tmp_path, WithGeneration("llama"), steps=2)
    assert [h["variant"] for h in parity.history] == ["within_budget/clean"] * 2


def test_logits_to_keep_is_a_missed_check_with_its_reason(tmp_path):
    class KeepsLast(HFModule):
        def training_step(self, batch, batch_idx):
            labels = batch[0].clone()
            return self.model(input_ids=batch[0], labels=labels[:, -3:], logits_to_keep=3).loss

    with pytest.warns(UserWarning, match="logits_to_keep=3 slices the hidden states"):
        parity = fit(tmp_path, KeepsLast("llama"), steps=1)
    assert parity.history == [] and len(parity.missed) == 1


def test_a_model_type_with_an_unknown_output_transform_is_refused():
    model = tiny_causal_lm("llama", vocab=VOCAB)
    model.config.logit_scale = 0.5
    with pytest.raises(ValueError, match=r"sets \{'logit_scale': 0.5\}, an output transform ce_guard does not know"):
        CausalLMSeam(model)
