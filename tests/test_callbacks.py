"""CEParityCallback and SeamHealthCallback in real (small, CPU) Lightning fits."""

import json
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from ce_guard.callbacks import CEParityCallback, SeamDriftError, SeamHealthCallback, find_guarded_module
from ce_guard.contract import CEContract
from ce_guard.metrics import METRICS
from lightning_helpers import TinyLM, receipts, token_loader, trainer


def test_clean_run_logs_parity_at_exactly_the_check_steps(tmp_path):
    callback = CEParityCallback(every_n_steps=2)
    t, log = trainer(tmp_path, [callback], max_steps=7)
    t.fit(TinyLM(), token_loader())
    assert log.parity_steps() == [0, 2, 4, 6]
    for _, metrics in log.calls:
        if "ce_parity/drift" in metrics:
            assert metrics["ce_parity/drift"] == 0.0
            assert math.isclose(metrics["ce_parity/grad_hidden_norm_ratio"], 1.0, rel_tol=1e-4)
            assert metrics["ce_parity/grad_cosine"] > 0.99999
            assert metrics["ce_parity/loss_rel_err"] < 1e-5
            assert math.isclose(metrics["ce_parity/grad_weight_norm_ratio"], 1.0, rel_tol=1e-4)
            margins = [metrics[f"ce_parity/margin_{q}"] for q in ("loss", "grad_hidden", "grad_weight")]
            assert all(0 <= m < 1 for m in margins), margins
    records = receipts(tmp_path)
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert all(r["cause"] == "within_budget" and r["bundle"] is None for r in records)
    assert not (tmp_path / "ce_guard" / "bundles").exists()


FAULTS = [
    ("bf16_accumulators", {}, "accumulator_dtype"),
    ("grad_scale", {"fault_scale": 3}, "normalization_scale"),
    ("ignore_in_denominator", {}, "ignore_index_leak"),
    ("missing_z_loss", {"contract": CEContract(vocab_size=96, z_loss=1e-2)}, "z_loss_boundary"),
]


@pytest.mark.parametrize("fault, kwargs, cause", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_is_flagged_at_the_first_check_under_warn(tmp_path, fault, kwargs, cause):
    t, log = trainer(tmp_path, [CEParityCallback(every_n_steps=3)], max_steps=4)
    with pytest.warns(UserWarning, match=f"CE seam drift at step 0 \\(rank 0\\): {cause}"):
        t.fit(TinyLM(fault=fault, **kwargs), token_loader())
    assert t.global_step == 4  # warn keeps training
    first = receipts(tmp_path)[0]
    assert first["step"] == 0 and first["drift"] and first["cause"] == cause
    assert first["variant"].startswith(f"{cause}/")
    bundle = torch.load(first["bundle"], weights_only=False)
    assert bundle["diagnosis"]["cause"] == cause and bundle["hidden"].shape[-1] == 16
    assert log.calls[0][1]["ce_parity/drift"] == 1.0
    worst = max(log.calls[0][1][f"ce_parity/margin_{q}"] for q in ("loss", "grad_hidden", "grad_weight"))
    assert worst > 1, log.calls[0][1]


def test_raise_policy_stops_at_the_first_check_with_the_evidence(tmp_path):
    t, _ = trainer(tmp_path, [CEParityCallback(every_n_steps=5, policy="raise")])
    with pytest.raises(SeamDriftError, match="normalization_scale") as info:
        t.fit(TinyLM(fault="grad_scale", fault_scale=4), token_loader())
    assert info.value.step == 0 and "k = 4" in info.value.summary
    assert receipts(tmp_path)[0]["bundle"].endswith("step00000000_rank0.pt")


def test_stop_policy_ends_the_fit_cleanly(tmp_path):
    t, _ = trainer(tmp_path, [CEParityCallback(every_n_steps=5, policy="stop")], max_steps=20)
    with pytest.warns(UserWarning, match="accumulator_dtype"):
        t.fit(TinyLM(fault="bf16_accumulators"), token_loader())
    assert t.global_step == 1 and t.should_stop


def test_gradient_accumulation_is_not_drift(tmp_path):
    t, log = trainer(tmp_path, [CEParityCallback(every_n_steps=2)], max_steps=4, accumulate_grad_batches=2)
    t.fit(TinyLM(), token_loader(batches=12))
    assert log.parity_steps() == [0, 2]
    assert all(r["cause"] == "within_budget" for r in receipts(tmp_path))
    assert receipts(tmp_path)[0]["report"]["n_visible"] == 4 * 12 - 4 * 3  # one micro-batch: 4 x 12, 3 padded/row


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_bf16_precision_is_judged_by_a_bf16_budget(tmp_path, precision):
    """bf16-mixed feeds the fused matmul what autocast made of fp32 tensors: the check must see the same."""
    t, _ = trainer(tmp_path, [CEParityCallback(every_n_steps=2)], max_steps=3, precision=precision)
    t.fit(TinyLM(), token_loader())
    records = receipts(tmp_path)
    assert all(r["cause"] == "within_budget" for r in records), [r["summary"] for r in records]
    assert "bfloat16" in records[0]["report"]["budget"]["source"]


def test_manual_optimisation_and_tied_weights(tmp_path):
    t, log = trainer(tmp_path, [CEParityCallback(every_n_steps=2)], max_steps=4)
    t.fit(TinyLM(manual=True, tie=True), token_loader())
    assert log.parity_steps() == [0, 2]
    assert all(r["cause"] == "within_budget" for r in receipts(tmp_path))


def test_token_sampling_keeps_the_full_count(tmp_path):
    t, _ = trainer(tmp_path, [CEParityCallback(every_n_steps=2, sample_tokens=10)], max_steps=3)
    t.fit(TinyLM(), token_loader())
    clean = receipts(tmp_path)[0]
    assert clean["sampled_tokens"] == 10 and clean["report"]["n_visible"] == 36 and clean["cause"] == "within_budget"

    t, _ = trainer(tmp_path / "fault", [CEParityCallback(every_n_steps=2, sample_tokens=10)], max_steps=1)
    with pytest.warns(UserWarning, match="ignore_index_leak"):
        t.fit(TinyLM(fault="ignore_in_denominator"), token_loader())


def test_non_check_steps_register_no_hooks_and_never_sync(tmp_path, monkeypatch):
    callback = CEParityCallback(every_n_steps=1000)
    module = TinyLM()
    t, _ = trainer(tmp_path, [callback], max_steps=1)
    t.fit(module, token_loader())  # step 0 is checked; every later step up to 999 is not
    syncs = []
    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: (syncs.append(_n), _o(self, *a, **k))[1])
    t.fit_loop.epoch_loop._batches_that_stepped = 0
    for step in range(1, 50):
        t.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total.completed = step
        t.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed = step
        assert t.global_step == step
        callback.on_train_batch_start(t, module, None, step)
        assert not module.output._forward_hooks and not module.output._forward_pre_hooks
        callback.on_train_batch_end(t, module, None, None, step)
    assert syncs == []


def test_state_round_trip_continues_the_schedule(tmp_path):
    first = CEParityCallback(every_n_steps=2)
    t, _ = trainer(tmp_path, [first], max_steps=3)
    t.fit(TinyLM(), token_loader())
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint holds, rank-invariant
    resumed = CEParityCallback(every_n_steps=2)
    resumed.load_state_dict(state)
    assert resumed.last_checked_step == 2 and [h["step"] for h in resumed.history] == [0, 2]
    assert resumed.state_dict() == first.state_dict()


def test_resume_from_a_checkpoint_does_not_recheck_or_lose_history(tmp_path):
    callback = CEParityCallback(every_n_steps=2)
    t, _ = trainer(tmp_path, [callback], max_steps=3, enable_checkpointing=True)
    t.fit(TinyLM(), token_loader())
    ckpt = next((tmp_path).rglob("*.ckpt"))
    resumed = CEParityCallback(every_n_steps=2)
    t2, log = trainer(tmp_path / "resumed", [resumed], max_steps=6)
    t2.fit(TinyLM(), token_loader(), ckpt_path=str(ckpt))
    assert log.parity_steps() == [4]
    assert [h["step"] for h in resumed.history] == [0, 2, 4]


def test_module_without_a_contract_warns_and_training_continues(tmp_path):
    module = TinyLM()
    del module.output.ce_contract
    t, _ = trainer(tmp_path, [CEParityCallback(every_n_steps=1)], max_steps=2)
    with pytest.warns(UserWarning, match="cannot guard this model.*no submodule declares `ce_contract`"):
        t.fit(module, token_loader())
    assert t.global_step == 2


def test_module_path_errors_name_the_fix():
    with pytest.raises(ValueError, match="names no submodule"):
        find_guarded_module(TinyLM(), "model.head")
    with pytest.raises(ValueError, match="declares no `ce_contract`"):
        find_guarded_module(TinyLM(), "mix")
    assert find_guarded_module(TinyLM(), "output").ce_contract.vocab_size == 96


def test_missing_logger_warns_and_receipts_still_written(tmp_path):
    t, _ = trainer(tmp_path, [CEParityCallback(every_n_steps=2)], max_steps=2, logger=False)
    with pytest.warns(UserWarning, match="has no logger"):
        t.fit(TinyLM(), token_loader())
    assert [r["step"] for r in receipts(tmp_path)] == [0]


def test_all_ignored_check_step_is_skipped_not_flagged(tmp_path):
    loader = token_loader(pad_every=1)  # every target is ignore_index
    t, log = trainer(tmp_path, [CEParityCallback(every_n_steps=1)], max_steps=2)
    t.fit(TinyLM(), loader)
    records = receipts(tmp_path)
    assert [r["cause"] for r in records] == ["no_visible_tokens"] * 2 and not any(r["drift"] for r in records)


def test_non_finite_fused_loss_is_reported_and_training_continues(tmp_path):
    module = TinyLM()
    with torch.no_grad():
        module.output.weight[3, 0] = float("nan")
    t, _ = trainer(tmp_path, [CEParityCallback(every_n_steps=1)], max_steps=2)
    with pytest.warns(UserWarning, match="non_finite"):
        t.fit(module, token_loader())
    assert receipts(tmp_path)[0]["cause"] == "non_finite" and t.global_step == 2


def test_a_check_that_fails_under_warn_is_kept_logged_and_training_continues(tmp_path, monkeypatch):
    """A check step without a verdict must not vanish: ``missed`` names it and why, ``ce_parity/missed`` marks
    it in the panels, and a resumed run keeps the record."""
    def broken_check(*args, **kwargs):
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr("ce_guard.callbacks.parity.check_seam", broken_check)
    parity = CEParityCallback(every_n_steps=2)
    t, log = trainer(tmp_path, [parity], max_steps=4)
    with pytest.warns(UserWarning, match="the check at step 2 failed: RuntimeError: compiler exploded"):
        t.fit(TinyLM(), token_loader())
    assert t.global_step == 4 and parity.history == []
    assert parity.missed == [{"step": 0, "reason": "failed: RuntimeError: compiler exploded"},
                             {"step": 2, "reason": "failed: RuntimeError: compiler exploded"}]
    assert [step for step, metrics in log.calls if "ce_parity/missed" in metrics] == [0, 2]
    resumed = CEParityCallback(every_n_steps=2)
    resumed.load_state_dict(parity.state_dict())
    assert resumed.missed == parity.missed


def test_the_callbacks_thresholds_reach_every_check(tmp_path, monkeypatch):
    from ce_guard import Thresholds
    from ce_guard.callbacks import parity as parity_module

    seen, real = [], parity_module.check_seam

    def spy(*args, **kwargs):
        seen.append(kwargs["thresholds"])
        return real(*args, **kwargs)

    monkeypatch.setattr(parity_module, "check_seam", spy)
    strict = Thresholds(scale_cosine=0.9999)
    t, _ = trainer(tmp_path, [CEParityCallback(every_n_steps=2, thresholds=strict)], max_steps=3)
    t.fit(TinyLM(), token_loader())
    assert seen == [strict, strict]
    assert CEParityCallback().thresholds == Thresholds()


def test_bad_arguments():
    with pytest.raises(ValueError, match="`thresholds` must be None or a ce_guard.Thresholds"):
        CEParityCallback(thresholds={"scale_cosine": 0.9})
    with pytest.raises(ValueError, match="`every_n_steps` must be an int >= 1"):
        CEParityCallback(every_n_steps=0)
    with pytest.raises(ValueError, match="`policy` must be one of"):
        CEParityCallback(policy="panic")
    with pytest.raises(ValueError, match="`every_n_steps_while_drifting` must be None or an int >= 1"):
        CEParityCallback(every_n_steps_while_drifting=0)
    with pytest.raises(ValueError, match="`clean_checks_to_relax` must be an int >= 1"):
        CEParityCallback(clean_checks_to_relax=0)


class SpikyLM(TinyLM):
    """The loss jumps 50x at step 6: a generic instability, whatever the seam does."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * (50.0 if self.global_step == 6 else 1.0)


def test_a_spike_right_after_the_seam_breaks_is_attributed_by_a_fresh_check(tmp_path):
    """The only scheduled check (step 0) is clean; the seam breaks at step 6 and the loss spikes there. The spike
    makes step 7 a check step, and that check, not the stale clean one, answers for it."""
    from ce_guard.demos.inject import InjectSeamFault

    parity, health = CEParityCallback(every_n_steps=100), SeamHealthCallback(warmup=3)
    t, log = trainer(tmp_path, [InjectSeamFault(step=6, fault="grad_scale"), parity, health], max_steps=9)
    with pytest.warns(UserWarning, match=r"loss spike at step 6 \(.*\); the seam check at step 7: drifting,"
                                         r" normalization_scale"):
        t.fit(SpikyLM(), token_loader())
    assert [h["step"] for h in parity.history][:2] == [0, 7] and parity.history[1]["drift"]
    assert {s["signal"]: s["attribution"] for s in health.spikes if s["step"] == 6} == {
        "loss": "seam", "grad_norm": "seam"}
    assert (7, {"ce_health/attributable_to_seam": 1.0}) in log.calls
    assert {key for _, metrics in log.calls for key in metrics} <= {m.key for m in METRICS}


def test_the_same_spike_over_a_clean_seam_says_look_elsewhere(tmp_path):
    parity, health = CEParityCallback(every_n_steps=100), SeamHealthCallback(warmup=3)
    t, _ = trainer(tmp_path, [parity, health], max_steps=9)
    with pytest.warns(UserWarning, match=r"loss spike at step 6 \(.*\); the seam check at step 7: clean: look"
                                         r" elsewhere"):
        t.fit(SpikyLM(), token_loader())
    assert [h["step"] for h in parity.history] == [0, 7]
    assert {s["attribution"] for s in health.spikes if s["step"] == 6} == {"elsewhere"}


def test_a_spike_without_a_parity_callback_is_reported_unattributed(tmp_path):
    health = SeamHealthCallback(warmup=3)
    t, _ = trainer(tmp_path, [health], max_steps=8)
    with pytest.warns(UserWarning, match="loss spike at step 6 .*not checked: no CEParityCallback"):
        t.fit(SpikyLM(), token_loader())
    assert {s["attribution"] for s in health.spikes} == {"unknown"}


class ScheduleAt(Callback):
    """Schedules a check of one step from its own hook, after the parity callback's hook has passed that step."""

    def __init__(self, parity: CEParityCallback, step: int) -> None:
        self.parity, self.step = parity, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.parity.schedule_check(trainer, pl_module, batch_idx)


def test_schedule_check_checks_this_step_without_calling_a_hook(tmp_path, monkeypatch):
    parity, hook_calls = CEParityCallback(every_n_steps=100), []
    original = CEParityCallback.on_train_batch_start

    def counted(self, trainer, pl_module, batch, batch_idx):
        hook_calls.append(batch_idx)
        return original(self, trainer, pl_module, batch, batch_idx)

    monkeypatch.setattr(CEParityCallback, "on_train_batch_start", counted)
    t, log = trainer(tmp_path, [parity, ScheduleAt(parity, step=3)], max_steps=5)
    t.fit(TinyLM(), token_loader())
    assert log.parity_steps() == [0, 3] and [h["step"] for h in parity.history] == [0, 3]
    assert hook_calls == [0, 1, 2, 3, 4]  # Lightning's calls alone, one per batch
    assert [r["variant"] for r in receipts(tmp_path)] == ["within_budget/clean"] * 2
    assert parity.history[1]["variant"] == "within_budget/clean"


def test_gradient_clipping_hands_its_norm_to_the_monitor(tmp_path, monkeypatch):
    """With clipping by norm the monitor takes no norm of its own: it watches the one clipping computed."""
    from ce_guard.callbacks import health as health_module

    health = SeamHealthCallback(warmup=3)
    t, _ = trainer(tmp_path, [health], max_steps=8, gradient_clip_val=1.0)
    seen = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    def no_second_norm(grads):
        raise AssertionError("the monitor took a norm of its own")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    monkeypatch.setattr(health_module, "total_grad_norm", no_second_norm)
    with pytest.warns(UserWarning, match="grad_norm spike at step 6"):
        t.fit(SpikyLM(), token_loader())
    assert len(seen) == 8 and health.stats["grad_norm"].count == 8  # step 7's norm is judged at train end
    assert "clip_grad_by_norm" not in vars(t.precision_plugin)  # the plugin is restored after the fit


def test_a_drift_verdict_raises_the_check_rate_until_clean_checks_in_a_row(tmp_path):
    from ce_guard.demos.inject import InjectSeamFault

    parity = CEParityCallback(every_n_steps=4, clean_checks_to_relax=2)
    t, _ = trainer(tmp_path, [InjectSeamFault(step=3, fault="grad_scale"), parity], max_steps=8)
    with pytest.warns(UserWarning, match="CE seam drift at step 4"):
        t.fit(TinyLM(), token_loader())
    assert [h["step"] for h in parity.history] == [0, 4, 5, 6, 7] and parity.rate.clean_checks_owed == 2
    # One bundle for the drift going on: the checks after the first point to it.
    assert [r["bundle"] for r in receipts(tmp_path)][1:] == [receipts(tmp_path)[1]["bundle"]] * 4
    assert len(list((tmp_path / "ce_guard" / "bundles").iterdir())) == 1
    for drifting in (False, True, False, False):  # the rate relaxes only after two clean checks in a row
        parity.rate.after_check(drifting, step=0)
    assert parity.rate.clean_checks_owed is None


class IntermittentLM(TinyLM):
    """The seam scales its gradient 2x on micro-batch 2 of every 4 accumulated, and is correct on the rest."""

    def training_step(self, batch, batch_idx):
        from ce_guard.fused_chunk import ChunkMath
        from ce_guard.testing import faulty_chunk_math

        contract = self.output.ce_contract
        faulty = batch_idx % 4 == 2
        self.output._math = faulty_chunk_math(contract, "grad_scale", 2) if faulty else ChunkMath.of(contract)
        return super().training_step(batch, batch_idx)


def test_each_check_samples_another_micro_batch_so_a_fault_in_one_of_k_is_met_within_k_checks(tmp_path):
    parity = CEParityCallback(every_n_steps=1, every_n_steps_while_drifting=None)
    t, _ = trainer(tmp_path, [parity], max_steps=4, accumulate_grad_batches=4)
    with pytest.warns(UserWarning, match="CE seam drift at step 2"):
        t.fit(IntermittentLM(), token_loader(batches=16))
    assert [h["drift"] for h in parity.history] == [False, False, True, False]


def test_a_layer_swapped_after_fit_start_stays_guarded(tmp_path):
    """Users re-wrap or replace the output layer (e.g. to switch kernels); the next check must see the new one."""
    from ce_guard.demos.inject import InjectSeamFault

    callback = CEParityCallback(every_n_steps=2)
    t, _ = trainer(tmp_path, [InjectSeamFault(step=2, fault="grad_scale"), callback], max_steps=3)
    with pytest.warns(UserWarning, match="CE seam drift at step 2"):
        t.fit(TinyLM(), token_loader())
    assert [(h["step"], h["cause"]) for h in callback.history] == [(0, "within_budget"), (2, "normalization_scale")]
