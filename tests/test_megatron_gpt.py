"""A megatron-core GPTModel guarded in place by CEParityCallback (Lightning's ModelParallelStrategy on gloo ranks).

The model computes its own output layer and per-token loss; the LightningModule takes Megatron's masked mean. Every
step is a check. Nothing here injects a fault: each named cause comes from megatron-core 0.16's own code.
"""

import sys
import tempfile
import time
import warnings
from collections import Counter

import pytest
import torch
from dist_helpers import run_distributed
from megatron_pins import megatron_core_for_spawned_ranks

pytest.importorskip("megatron.core", reason="needs the megatron extra: pip install 'ce_guard[megatron]'")
pytestmark = pytest.mark.distributed


def _fit(world, steps, **options):
    """Fit ``MegatronGPTLit(**options)`` at TP = world for ``steps`` steps, checking each; what the guard said."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from ce_guard.callbacks import CEParityCallback
    from ce_guard.demos.megatron_gpt import MegatronGPTLit, next_token_loader

    callback = CEParityCallback(every_n_steps=1, remind_every=10_000)
    root = tempfile.mkdtemp(prefix="ce_guard_mgpt_")
    trainer = pl.Trainer(strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=world),
                         accelerator="cpu", devices=world, max_steps=steps, logger=False, callbacks=[callback],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(MegatronGPTLit(**options), next_token_loader(batches=steps))
    return {"seconds": time.perf_counter() - started, "causes": Counter(h["cause"] for h in callback.history),
            "first": (callback.history[0]["variant"], callback.history[0]["summary"]) if callback.history else None,
            "missed": callback.missed, "global_step": trainer.global_step}


def clean_cases(rank, world, steps):
    return {str(dtype): _fit(world, steps, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("world", [1, 2])
def test_megatron_gpt_is_clean_in_place(world):
    started = time.perf_counter()
    results = run_distributed(clean_cases, world, 100, timeout=600)
    print(f"\nTP={world}: {time.perf_counter() - started:.1f} s with spawning")
    for rank, cases in enumerate(results):
        for dtype, case in cases.items():
            print(f"  rank {rank} {dtype}: fit {case['seconds']:.1f} s, {dict(case['causes'])}; {case['first']}")
            assert case["global_step"] == 100 and not case["missed"], case
            assert case["causes"] == Counter(within_budget=100), case


def named_cases(rank, world):
    """Label smoothing (Megatron's loss with ``label_smoothing``, via a subclass: 0.16 has no config field) and
    ``cross_entropy_loss_fusion`` with the native implementation."""
    return {"smoothing fp32": _fit(world, 20, label_smoothing=0.1),
            "smoothing bf16": _fit(world, 20, label_smoothing=0.1, dtype=torch.bfloat16),
            "smoothing tied fp32": _fit(world, 10, label_smoothing=0.1, tie_embeddings=True),
            "fused native fp32": _fit(world, 10, cross_entropy_fusion=True)}


@pytest.mark.parametrize("world, version", [(1, None), (2, None), (2, "0.19.2")],
                         ids=["TP1-installed", "TP2-installed", "TP2-0.19.2"])
def test_megatron_gpt_names_what_megatron_computes(world, version):
    """On the installed 0.16.1 and, at TP = 2, on the pinned 0.19.2: both still smooth over the local slice and
    round the native fused CE's logit gradient to bf16."""
    with megatron_core_for_spawned_ranks(version):
        results = run_distributed(named_cases, world, timeout=600)
    for rank, cases in enumerate(results):
        for name, case in cases.items():
            print(f"\nTP={world} rank {rank} {name}: fit {case['seconds']:.1f} s, {dict(case['causes'])}; {case['first']}")
            assert not case["missed"], case
        for name in ("smoothing fp32", "smoothing bf16", "smoothing tied fp32"):
            causes = cases[name]["causes"]
            if world == 1:  # Megatron's convention, mapped to the contract, holds on the whole vocabulary
                assert set(causes) == {"within_budget"}, (name, causes)
            else:  # its smoothing term is taken over the local vocab slice
                assert set(causes) == {"label_smoothing_local_v"}, (name, causes)
                assert "local vocab slice" in cases[name]["first"][1], cases[name]
        # megatron-core's native fused CE rounds the logit gradient to bf16 whatever the logits' dtype
        assert set(cases["fused native fp32"]["causes"]) == {"accumulator_dtype"}, cases["fused native fp32"]


def seam_cases(rank, world):
    """find_seam on a bare GPTModel; a call without labels is not the seam; an undeclared loss override is refused."""
    from ce_guard.adapters import megatron_tensor_parallel
    from ce_guard.demos.megatron_gpt import MegatronGPTLit
    from ce_guard.seams import SeamRefused, find_seam
    from ce_guard.seams.megatron import MegatronSeam

    megatron_tensor_parallel(None)
    lit = MegatronGPTLit()
    lit.configure_model()
    seam = find_seam(lit)
    assert isinstance(seam, MegatronSeam) and seam.name == "model", seam.describe()
    tokens = torch.randint(0, 256, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    recording = seam.record()
    logits = lit.model(tokens, positions, None)  # no labels: logits, not the seam
    assert logits.shape == (2, 16, 256) and recording.hidden is None and recording.window_tokens() == 0
    losses = lit.model(tokens, positions, None, labels=tokens)
    (losses * 0.5).sum().backward()
    recording.remove()
    assert recording.problem() is None and recording.window_tokens() == 32
    assert recording.loss.shape == recording.upstream.shape == (16, 2)  # sequence-first, as the hidden states
    assert torch.equal(recording.loss, losses.detach().transpose(0, 1))
    assert torch.all(recording.upstream == 0.5)

    class OwnLoss(type(lit.model)):
        def compute_language_model_loss(self, labels, logits):
            return super().compute_language_model_loss(labels, logits) * 2

    lit.model.__class__ = OwnLoss
    with pytest.raises(SeamRefused, match="overrides `compute_language_model_loss`"):
        find_seam(lit)
    return True


def test_megatron_gpt_seam_records_the_model_call_with_labels():
    assert run_distributed(seam_cases, 1, timeout=300) == [True]


def test_find_seam_leaves_megatron_alone_where_it_is_not_imported(monkeypatch):
    from torch import nn

    from ce_guard.seams import DeclaredSeam, find_seam

    monkeypatch.delitem(sys.modules, "megatron.core", raising=False)
    assert isinstance(find_seam(nn.Sequential(nn.Linear(2, 2))), DeclaredSeam)
