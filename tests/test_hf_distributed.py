"""Hugging Face causal LMs under FSDP2 at DP = 2 (Lightning's ModelParallelStrategy, gloo): the head's weight is a
sharded DTensor between steps, each rank checks its own micro-batch, and a fault is named on every rank."""

import os
import tempfile
import warnings

import pytest

from dist_helpers import run_distributed

pytest.importorskip("transformers")
pytestmark = pytest.mark.distributed


def _fit(root, architecture, fault=None):
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    from ce_guard.callbacks import CEParityCallback
    from ce_guard.testing.causal_lm_faults import break_causal_lm
    from test_hf_causal_lm import HFModule, loader

    class Sharded(HFModule):
        def configure_model(self):
            mesh = self.device_mesh["data_parallel"]
            for layer in self.model.get_decoder().layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
            if fault:
                break_causal_lm(self.model, fault)

    parity = CEParityCallback(every_n_steps=2)
    trainer = pl.Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                         accelerator="cpu", devices=2, max_steps=4, logger=False, callbacks=[parity],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root)
    module = Sharded(architecture)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(8))
    weight = module.model.get_output_embeddings().weight
    return {"variants": [h["variant"] for h in parity.history], "missed": parity.missed,
            "sharded": type(weight).__name__ == "DTensor"}


def scenarios(rank, world):
    import torch.distributed as dist

    box = [tempfile.mkdtemp(prefix="ce_guard_hf_") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return {name: _fit(os.path.join(box[0], name), arch, fault) for name, arch, fault in [
        ("llama", "llama", None), ("bamba", "bamba", None), ("zamba2_tied", "zamba2", None),
        ("jamba_ignored_in_divisor", "jamba", "ignore_in_denominator")]}


@pytest.fixture(scope="module")
def results():
    return run_distributed(scenarios, 2, timeout=400)


@pytest.mark.parametrize("name", ["llama", "bamba", "zamba2_tied"])
def test_clean_under_fsdp2_on_every_rank(results, name):
    for res in results:
        assert res[name]["sharded"] and res[name]["variants"] == ["within_budget/clean"] * 2, res[name]


def test_a_fault_under_fsdp2_is_named_on_every_rank(results):
    for res in results:
        assert res["jamba_ignored_in_divisor"]["variants"][0] == "ignore_index_leak/padding_in_divisor"
