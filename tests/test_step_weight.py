"""The training contract: the weight a micro-batch's loss reaches the optimizer with, named when it is not the
contract's (docs/faults.md rows 14-15). The seam itself is clean in every test here: the fault is outside it."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ce_guard import CEContract, SeamOutputs, SeamRecord, TrainingContract, check_seam
from ce_guard.callbacks import CEParityCallback
from ce_guard.demos.inject import InjectTrainingFault
from ce_guard.step_weight import LossTerm, StepWindow, implied_training_contract, step_weight
from ce_guard.testing import INJECTIONS
from tests.lightning_helpers import TinyLM, trainer

VOCAB, SEQ = 96, 12


def padded_loader(batches: int, batch_size: int = 2, seed: int = 0) -> DataLoader:
    """Batch i pads the first (i * 5) % 11 targets of each row: unequal counts from one micro-batch to the next."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batches * batch_size, SEQ), generator=gen)
    targets = torch.randint(0, VOCAB, (batches * batch_size, SEQ), generator=gen)
    for i in range(batches):
        targets[i * batch_size:(i + 1) * batch_size, : (i * 5) % 11] = -100
    return DataLoader(TensorDataset(tokens, targets), batch_size=batch_size)


def counted(batch) -> int:
    return int((batch[1] != -100).sum())


class ScaledLM(TinyLM):
    """A ``loss * 2`` in ``training_step``, outside the guarded layer."""

    def training_step(self, batch, batch_idx):
        return 2 * super().training_step(batch, batch_idx)


class TokenWeightedLM(TinyLM):
    """Every token of the accumulation window weighs alike: the layer sums, the step divides by the window's
    counted tokens and undoes Lightning's fixed divide by ``accumulate_grad_batches``."""

    def __init__(self, window_tokens: list[int]) -> None:
        super().__init__(VOCAB, contract=CEContract(vocab_size=VOCAB, reduction="sum"))
        self.window_tokens = window_tokens

    def training_step(self, batch, batch_idx):
        k = self.trainer.accumulate_grad_batches
        return self(*batch) / self.window_tokens[batch_idx // k] * k


def window_counts(loader: DataLoader, k: int) -> list[int]:
    per_batch = [counted(b) for b in loader]
    return [sum(per_batch[i:i + k]) for i in range(0, len(per_batch), k)]


def test_a_loss_doubled_in_training_step_is_named_at_the_first_check(tmp_path):
    parity = CEParityCallback(every_n_steps=1)
    t, _ = trainer(tmp_path, [parity], max_steps=2)
    with pytest.warns(UserWarning, match="loss_scaled_outside"):
        t.fit(ScaledLM(), padded_loader(4))
    first = parity.history[0]
    assert first["variant"] == "loss_scaled_outside/factor"
    assert "2x heavier than the training contract (micro_batch_mean) says: expected 1 per micro-batch" in first["summary"]


def test_the_accumulation_divide_left_out_is_named(tmp_path):
    """``accumulate_grad_batches`` under manual-free Lightning divides for you; a loss multiplied back by k
    weighs each micro-batch as a whole step."""

    class Undivided(TinyLM):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * self.trainer.accumulate_grad_batches

    parity = CEParityCallback(every_n_steps=1)
    t, _ = trainer(tmp_path, [parity], max_steps=1, accumulate_grad_batches=4)
    with pytest.warns(UserWarning, match="loss_scaled_outside"):
        t.fit(Undivided(), padded_loader(4))
    assert parity.history[0]["variant"] == "loss_scaled_outside/accumulation"
    assert "4x heavier" in parity.history[0]["summary"]


def test_lightnings_fixed_divide_under_a_token_weighted_contract_is_named_with_its_factor(tmp_path):
    k, loader = 4, padded_loader(8)
    per_batch = [counted(b) for b in loader]
    parity = CEParityCallback(every_n_steps=1, training_contract=TrainingContract("window_tokens"),
                              every_n_steps_while_drifting=None)
    t, _ = trainer(tmp_path, [parity], max_steps=2, accumulate_grad_batches=k)
    with pytest.warns(UserWarning, match="window_weighting"):
        t.fit(TinyLM(VOCAB), loader)
    # Check c records micro-batch c % 4 of its window: step 0 the first, step 1 the second.
    for check, entry in enumerate(parity.history):
        window = per_batch[check * k:(check + 1) * k]
        mine = window[check % k]
        factor = (1 / k) / (mine / sum(window))
        assert entry["variant"] == "window_weighting/micro_batch_mean"
        assert f"{factor:.4g}x" in entry["summary"] and f"this one's {mine} of the window's {sum(window)}" in (
            entry["summary"])


def test_a_correct_token_weighted_step_is_clean_over_50_checks(tmp_path):
    k, loader = 4, padded_loader(200, batch_size=1)
    parity = CEParityCallback(every_n_steps=1, training_contract=TrainingContract("window_tokens"))
    t, _ = trainer(tmp_path, [parity], max_steps=50, accumulate_grad_batches=k)
    t.fit(TokenWeightedLM(window_counts(loader, k)), loader)
    assert [h["variant"] for h in parity.history] == ["within_budget/clean"] * 50 and not parity.missed


def test_the_epochs_short_last_window_divided_by_the_full_count_is_named(tmp_path):
    """Six batches at accumulation 4: the second step's window has two, each divided by 4 (Lightning issue 19987)."""
    parity = CEParityCallback(every_n_steps=1, every_n_steps_while_drifting=None)
    t, _ = trainer(tmp_path, [parity], max_steps=2, accumulate_grad_batches=4)
    with pytest.warns(UserWarning, match="window_weighting: .* 0.5x lighter"):
        t.fit(TinyLM(VOCAB), padded_loader(6))
    assert [h["variant"] for h in parity.history] == ["within_budget/clean", "window_weighting/partial_window"]
    assert "2 micro-batches, and each was divided by the full window's 4" in parity.history[1]["summary"]


def test_the_token_weighted_step_keeps_its_short_last_window_right(tmp_path):
    k, loader = 4, padded_loader(6)
    parity = CEParityCallback(every_n_steps=1, training_contract=TrainingContract("window_tokens"))
    t, _ = trainer(tmp_path, [parity], max_steps=2, accumulate_grad_batches=k)
    t.fit(TokenWeightedLM(window_counts(loader, k)), loader)
    assert [h["variant"] for h in parity.history] == ["within_budget/clean"] * 2


TRAINING_ROWS = [row for row in INJECTIONS if row.training_step]


@pytest.mark.parametrize("row", TRAINING_ROWS, ids=lambda row: row.switch)
@pytest.mark.parametrize("dtype, precision", [("float32", "32-true"), ("bfloat16", "bf16-mixed")])
def test_every_training_loop_row_of_the_fault_table_is_named_at_the_first_check(tmp_path, row, dtype, precision):
    parity = CEParityCallback(every_n_steps=1)
    t, _ = trainer(tmp_path, [parity, InjectTrainingFault(step=0, fault=row.switch)], max_steps=1,
                   accumulate_grad_batches=4, precision=precision)
    with pytest.warns(UserWarning, match=row.cause.value):
        t.fit(TinyLM(VOCAB), padded_loader(4))
    assert parity.history[0]["variant"] == row.variants[dtype], parity.history[0]["summary"]


def test_no_training_contract_checks_the_seam_alone(tmp_path):
    parity = CEParityCallback(every_n_steps=1, training_contract=None)
    t, log = trainer(tmp_path, [parity], max_steps=2)
    t.fit(ScaledLM(), padded_loader(4))
    assert [h["variant"] for h in parity.history] == ["within_budget/clean"] * 2
    assert all(m.get("ce_parity/step_weight_factor") is None for _, m in log.calls)


def test_the_step_weight_is_logged_beside_the_seams_metrics(tmp_path):
    t, log = trainer(tmp_path, [CEParityCallback(every_n_steps=1)], max_steps=2)
    t.fit(TinyLM(VOCAB), padded_loader(4))
    logged = [m["ce_parity/step_weight_factor"] for _, m in log.calls if "ce_parity/step_weight_factor" in m]
    assert logged == pytest.approx([1.0, 1.0], abs=1e-6)


# ------------------------------------------------------------------------------------ the core, without Lightning
def _record(upstream, n=64, d=8, pad=16, reduction="mean"):
    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(n, d, generator=gen), torch.randn(VOCAB, d, generator=gen)
    targets = torch.randint(0, VOCAB, (n,), generator=gen)
    targets[:pad] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(h @ w.T, targets, reduction=reduction)
    g = torch.as_tensor(upstream, dtype=loss.dtype).expand_as(loss)
    gh, gw = torch.autograd.grad(loss, [h, w], g)
    return SeamRecord(hidden=hidden, weight=weight, targets=targets,
                      fused=SeamOutputs(loss=loss.detach(), grad_hidden=gh, grad_weight=gw), upstream=upstream)


# Every variant of the training loop's causes, on an exact seam (tests/test_diagnosis_golden.py holds them to it).
STEP_CASES = [
    ("micro_batch_mean", StepWindow(4, 4, 200, 200), 0.25, "within_budget/clean"),
    ("micro_batch_mean", StepWindow(4, 4, 200, 200), 1.0, "loss_scaled_outside/accumulation"),
    ("micro_batch_mean", StepWindow(2, 4, 100, 100), 0.25, "window_weighting/partial_window"),
    ("window_tokens", StepWindow(4, 4, 200, 200), 48 / 200, "within_budget/clean"),
    ("window_tokens", StepWindow(4, 4, 200, 200), 0.25, "window_weighting/micro_batch_mean"),
    ("global_tokens", StepWindow(4, 4, 200, 500, dp_size=2), 2 * 48 / 500, "within_budget/clean"),
    ("global_tokens", StepWindow(4, 4, 200, 500, dp_size=2), 48 / 200, "window_weighting/local_tokens"),
    ("global_tokens", StepWindow(1, 1, 48, 100, dp_size=2), 1.0, "window_weighting/local_tokens"),
    ("global_tokens", StepWindow(1, 1, 48, 100, dp_size=2), 2 * 0.96, "loss_scaled_outside/world_size"),
    ("micro_batch_mean", StepWindow(1, 1, 48, 48, loss_scale=1024.0), 1024.0, "within_budget/clean"),
    ("micro_batch_mean", StepWindow(1, 1, 48, 48, loss_scale=1024.0), 3 * 1024.0, "loss_scaled_outside/factor"),
    # An MTP depth of weight 0.1 counting 48 tokens where the main loss counts 50 (tests/test_megatron_mtp.py in a fit)
    ("global_tokens", StepWindow(1, 1, 48, 48, term=LossTerm("MTP depth 1", 0.1, 50, 50, 50)), 0.1,
     "within_budget/clean"),
    ("global_tokens", StepWindow(1, 1, 48, 48, term=LossTerm("MTP depth 1", 0.1, 50, 50, 50)), 0.1 * 48 / 50,
     "window_weighting/mtp_main_count"),
    ("global_tokens", StepWindow(1, 1, 48, 100, dp_size=2, term=LossTerm("MTP depth 1", 0.1, 50, 50, 110)),
     0.1 * 2 * 50 / 110, "window_weighting/mtp_local_count"),
]


@pytest.mark.parametrize("weighting, window, upstream, variant", STEP_CASES)
def test_check_seam_holds_the_upstream_to_the_training_contract(weighting, window, upstream, variant):
    """48 counted tokens of 64 in the recorded micro-batch; the seam is exact, so only the step weight can drift."""
    result = check_seam(_record(upstream), CEContract(vocab_size=VOCAB), window=window,
                        training=TrainingContract(weighting))
    assert result.diagnosis.variant == variant, result.diagnosis.summary
    assert result.report.step_weight.tokens == 48


def test_per_token_upstreams_are_summed_over_the_counted_tokens():
    """A masked mean outside the layer (``reduction='none'``): the weights over counted tokens sum to 1/k."""
    upstream = torch.full((64,), 0.25 / 48)
    result = check_seam(_record(upstream, reduction="none"), CEContract(vocab_size=VOCAB, reduction="none"),
                        window=StepWindow(4, 4, 200, 200), training=TrainingContract())
    assert result.diagnosis.variant == "within_budget/clean"
    assert result.report.step_weight.found == pytest.approx(0.25, rel=1e-6)


def test_the_tolerance_is_the_upstreams_rounding():
    fp32 = step_weight(1.00005, 10, StepWindow(1, 1, 10, 10), TrainingContract())
    bf16 = step_weight(1.004, 10, StepWindow(1, 1, 10, 10, loss_dtype=torch.bfloat16), TrainingContract())
    off = step_weight(1.0002, 10, StepWindow(1, 1, 10, 10), TrainingContract())
    assert not fp32.off and not bf16.off and off.off


def test_the_implied_training_contract_follows_the_seams_normalisation():
    assert implied_training_contract(CEContract(vocab_size=8)) == TrainingContract("micro_batch_mean")
    assert implied_training_contract(CEContract(vocab_size=8, normalize_by="given_count")) == (
        TrainingContract("window_tokens"))
    group = CEContract(vocab_size=8, normalize_by="global_tokens", grad_sync="sum")
    assert implied_training_contract(group) == TrainingContract("global_tokens", data_parallel="sum")


def test_bad_training_contracts_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="`weighting` must be one of"):
        TrainingContract("tokens")
    with pytest.raises(ValueError, match="`training_contract` must be 'auto', None or a ce_guard.TrainingContract"):
        CEParityCallback(training_contract="window_tokens")


def test_an_amp_loss_scale_is_divided_out(tmp_path):
    """fp16 AMP multiplies the loss by the GradScaler's scale before backward: not a fault of the training step."""
    from lightning.pytorch.plugins import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    parity = CEParityCallback(every_n_steps=1)
    t, _ = trainer(tmp_path, [parity], max_steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    t.fit(TinyLM(VOCAB), padded_loader(4))
    assert scaler is not None and scaler.get_scale() > 1
    assert [h["variant"] for h in parity.history] == ["within_budget/clean"] * 2, parity.history
