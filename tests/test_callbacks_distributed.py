"""CEParityCallback under ModelParallelStrategy on 2 gloo ranks: DP=2 with FSDP2, and TP=2 vocab-parallel."""

import os
import tempfile
import warnings

import pytest
import torch

from dist_helpers import run_distributed

pytestmark = pytest.mark.distributed


def _fit(root, dp, tp, *, fault=None, policy="warn", nan_on_rank=None, cannot_record_on_rank=None, max_steps=3,
         devices=2):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from ce_guard.callbacks import CEParityCallback
    from ce_guard.receipt import read_receipts
    from lightning_helpers import MeshTinyLM, RecordingLogger, uneven_padding_loader

    logger = RecordingLogger(root)
    callback = CEParityCallback(every_n_steps=2, policy=policy)
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp), accelerator="cpu",
        devices=devices, max_steps=max_steps, logger=logger, callbacks=[callback], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from ce_guard.recording import SeamRecording

        original = SeamRecording.problem
        if cannot_record_on_rank == torch.distributed.get_rank():
            # This rank's recording reports a problem (as when no backward reaches the seam); the others record.
            SeamRecording.problem = lambda self: "simulated: this rank could not record the seam"
        try:
            trainer.fit(MeshTinyLM(fault=fault, nan_on_rank=nan_on_rank), uneven_padding_loader())
        finally:
            SeamRecording.problem = original
    path = os.path.join(root, "ce_guard", "receipts.jsonl")
    return {
        "history": callback.history,
        "receipts": list(read_receipts(path)) if os.path.exists(path) else [],
        "logged_steps": logger.parity_steps(),
        "global_step": trainer.global_step,
        "warnings": [str(w.message) for w in caught if "CE seam" in str(w.message) or "skipped" in str(w.message)],
        "bundles": sorted(os.listdir(os.path.join(root, "ce_guard", "bundles")))
        if os.path.isdir(os.path.join(root, "ce_guard", "bundles")) else [],
    }


def scenarios(rank, world):
    out = {}
    base = tempfile.mkdtemp(prefix="ce_guard_dist_") if rank == 0 else None
    import torch.distributed as dist

    box = [base]
    dist.broadcast_object_list(box, src=0)
    base = box[0]
    out["dp_clean"] = _fit(os.path.join(base, "dp_clean"), dp=2, tp=1)
    out["dp_local"] = _fit(os.path.join(base, "dp_local"), dp=2, tp=1, fault="local_normalization")
    out["tp_clean"] = _fit(os.path.join(base, "tp_clean"), dp=1, tp=2)
    out["tp_unmasked"] = _fit(os.path.join(base, "tp_unmasked"), dp=1, tp=2, fault="unmasked_partition_targets",
                              policy="stop", max_steps=5)
    out["dp_nan_rank1"] = _fit(os.path.join(base, "dp_nan"), dp=2, tp=1, nan_on_rank=1)
    out["dp_skip_rank1"] = _fit(os.path.join(base, "dp_skip"), dp=2, tp=1, cannot_record_on_rank=1)
    out["dp_spike_rank1"] = _spike_on_one_rank(os.path.join(base, "dp_spike"), spiking_rank=1)
    return out


def _spike_on_one_rank(root, spiking_rank):
    """DP = 2 where only one rank's loss jumps 50x at step 6: judged on its own loss, that rank alone would
    ask for a check (a collective) and wait forever for the other."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from ce_guard.callbacks import CEParityCallback, SeamHealthCallback
    from lightning_helpers import MeshTinyLM, uneven_padding_loader

    class OneRankSpikes(MeshTinyLM):
        def training_step(self, batch, batch_idx):
            jump = 50.0 if self.global_step == 6 and self.global_rank == spiking_rank else 1.0
            return super().training_step(batch, batch_idx) * jump

    parity, health = CEParityCallback(every_n_steps=100), SeamHealthCallback(warmup=3)
    trainer = pl.Trainer(
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), accelerator="cpu", devices=2,
        max_steps=9, logger=False, callbacks=[parity, health], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(OneRankSpikes(), uneven_padding_loader(rows=40))
    return {"checks": [h["step"] for h in parity.history], "global_step": trainer.global_step,
            "spikes": [(s["step"], s["signal"], round(s["value"], 6), s["attribution"]) for s in health.spikes]}


@pytest.fixture(scope="module")
def results():
    return run_distributed(scenarios, 2, timeout=400)


def test_dp_clean_run_is_within_budget_on_every_rank(results):
    for res in results:
        assert [h["cause"] for h in res["dp_clean"]["history"]] == ["within_budget", "within_budget"]
    assert results[0]["dp_clean"]["logged_steps"] == [0, 2]
    assert [r["step"] for r in results[0]["dp_clean"]["receipts"]] == [0, 2]  # rank zero alone writes receipts


def test_local_normalisation_with_unequal_padding_is_flagged_at_the_first_check(results):
    for res in results:
        first = res["dp_local"]["history"][0]
        assert first["step"] == 0 and first["drift"] and first["cause"] == "normalization_owner", first
    receipt = results[0]["dp_local"]["receipts"][0]
    assert (receipt["ranks"], receipt["drifting_ranks"], receipt["rank"]) == (2, 2, 0)
    assert receipt["cause"] == "normalization_owner"
    assert "divides by this rank's non-ignored tokens" in receipt["summary"]
    assert results[0]["dp_local"]["bundles"] == ["step00000000_rank0.pt", "step00000000_rank1.pt"]  # one per rank


def test_tp_clean_run_is_within_budget(results):
    for res in results:
        assert all(h["cause"] == "within_budget" for h in res["tp_clean"]["history"]), res["tp_clean"]["history"]


def test_receipts_state_each_reduction_and_its_group(results):
    tp_seam = results[0]["tp_clean"]["receipts"][0]["seam"]
    assert tp_seam["layout"] == "[S,B,V/TP]"
    assert tp_seam["running_max"].endswith("all-reduce MAX over the TP group (2 ranks)")
    assert tp_seam["denominator"].endswith("all-reduce SUM over the TP group (2 ranks)")
    assert "targets outside [0, 48)" in tp_seam["target_masking"]
    dp_seam = results[0]["dp_clean"]["receipts"][0]["seam"]
    assert dp_seam["token_count"] == "non-ignored tokens all-reduced SUM over the token group (2 ranks)"
    assert dp_seam["normalization"].startswith("mean over global non-ignored tokens summed over a token group of 2")


def test_unmasked_partition_targets_stop_the_fit_on_every_rank(results):
    for res in results:
        run = res["tp_unmasked"]
        assert run["history"][0]["cause"] == "target_masking" and run["global_step"] == 1, run["history"]


def test_nan_on_one_rank_is_agreed_and_never_hangs(results):
    for res in results:
        first = res["dp_nan_rank1"]["history"][0]
        assert first["drift"] and first["cause"] == "non_finite" and first["rank"] == 1, first
        assert res["dp_nan_rank1"]["global_step"] == 3  # warn: training went on on both ranks


def test_a_rank_that_cannot_check_makes_every_rank_skip_without_a_hang(results):
    for rank, res in enumerate(results):
        run = res["dp_skip_rank1"]
        assert run["history"] == [] and run["global_step"] == 3, run
        if rank == 0:  # rank zero warns, naming the step and that another rank could not record
            assert any("the check at step 0 skipped: another rank could not record the seam" in w
                       for w in run["warnings"]), run["warnings"]


def test_ranks_whose_own_losses_disagree_about_a_spike_decide_alike_and_finish(results):
    one, other = (res["dp_spike_rank1"] for res in results)
    assert one == other, (one, other)  # the same spikes (on the mean loss), the same checks, on both ranks
    assert one["global_step"] == 9 and 7 in one["checks"], one  # the step after the spike is checked
    assert ("loss" in {signal for step, signal, _, _ in one["spikes"] if step == 6}
            and {a for step, _, _, a in one["spikes"] if step == 6} == {"elsewhere"}), one


def two_d_scenarios(rank, world):
    import torch.distributed as dist

    box = [tempfile.mkdtemp(prefix="ce_guard_2d_") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return {"clean": _fit(os.path.join(box[0], "clean"), dp=2, tp=2, devices=4),
            "local": _fit(os.path.join(box[0], "local"), dp=2, tp=2, devices=4, fault="local_normalization")}


def test_dp2_x_tp2_mesh_is_clean_and_flags_local_normalisation():
    results = run_distributed(two_d_scenarios, 4, timeout=400)
    for rank, res in enumerate(results):
        assert [h["cause"] for h in res["clean"]["history"]] == ["within_budget", "within_budget"], (rank, res)
        first = res["local"]["history"][0]
        assert first["step"] == 0 and first["cause"] == "normalization_owner", (rank, first)
    seam = results[0]["clean"]["receipts"][0]["seam"]
    assert seam["running_max"].endswith("over the TP group (2 ranks)")
    assert seam["token_count"] == "non-ignored tokens all-reduced SUM over the token group (2 ranks)"


def _grad_norm_child(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from ce_guard.spike import total_grad_norm

    line, grid = init_device_mesh("cpu", (2,)), init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    g = torch.Generator().manual_seed(0)  # the same full tensors on both ranks
    a, b, c = torch.randn(8, 6, generator=g), torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    partial_parts = torch.randn(2, 7, generator=g)  # the partial gradient's full value is their sum
    own = torch.randn(4, generator=g) * (rank + 1)  # a plain tensor: this rank's own slice (vocab-parallel head)
    grads = [distribute_tensor(a, line, [Shard(0)]), distribute_tensor(b, line, [Replicate()]),
             distribute_tensor(c, grid, [Replicate(), Shard(1)]),
             DTensor.from_local(partial_parts[rank], line, [Partial()]), own]
    expected = torch.stack([a.norm(), b.norm(), c.norm(), partial_parts.sum(0).norm(), own.norm()]).norm()
    return float(total_grad_norm(grads)), float(expected)


def test_total_grad_norm_sums_shards_once_across_meshes_and_placements():
    """Shard, Replicate, a 2-D mesh, a not-yet-reduced Partial and a plain tensor, in one norm."""
    for got, expected in run_distributed(_grad_norm_child, 2):
        assert got == pytest.approx(expected, rel=1e-6)
