"""Megatron's multi-token prediction (MTP) losses held to the training contract, on a megatron-core GPTModel in place.

Each MTP depth's per-token loss enters the graph below the seam (``MTPLossAutoScaler``); the guard records its
upstream beside the seam and holds it to the model's training contract on the depth's own tokens (the loss mask
rolled by the depth). In megatron-core 0.16.1 with ``calculate_per_token_loss=True`` the MTP term is summed and
divided by the main loss's count N (``finalize_model_grads``), where its own M < N is due: named with M/N
(Megatron-LM issue 2417). Megatron-LM PR 3159 (in megatron-core 0.19.2, pinned: ``megatron_pins``) rescales it
by this rank's N/M: clean at DP = 1, named at DP = 2 with unequal counts (issue 7452, item 3). Nothing is injected:
each version's cases run its own code.
"""

import tempfile
import time
import warnings

import pytest
import torch
from dist_helpers import run_distributed
from megatron_pins import megatron_core_for_spawned_ranks, mute_mtp_loss_logger

pytest.importorskip("megatron.core", reason="needs the megatron extra: pip install 'ce_guard[megatron]'")
pytestmark = pytest.mark.distributed

STEPS = 2


def _rolled(mask: torch.Tensor, depth: int = 1) -> torch.Tensor:
    """The loss mask as megatron-core's ``roll_tensor`` rolls it for MTP depth ``depth`` (one CP rank)."""
    for _ in range(depth):
        mask = torch.roll(mask, -1, -1)
        mask[..., -1] = 0
    return mask


def _fit(dp, steps, accumulate=1, unscaled=False, **options):
    """Fit ``MegatronGPTLit(mtp_num_layers=1, **options)`` on ``dp`` data-parallel gloo ranks (TP = 1), checking
    every step; the verdicts and this rank's loss masks. ``unscaled``: a loop that never sets the MTP scale."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from megatron.core.transformer import multi_token_prediction

    from ce_guard.callbacks import CEParityCallback
    from ce_guard.demos.megatron_gpt import MegatronGPTLit, next_token_loader

    mute_mtp_loss_logger()

    class Kept(MegatronGPTLit):
        def __init__(self, **options):
            super().__init__(**options)
            self.masks = []

        def training_step(self, batch, batch_idx):
            self.masks.append(batch[2].clone())
            loss = super().training_step(batch, batch_idx)
            if unscaled:
                multi_token_prediction.MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
            return loss

    callback = CEParityCallback(every_n_steps=1, remind_every=10_000)
    trainer = pl.Trainer(strategy=ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=1),
                         accelerator="cpu", devices=dp, max_steps=steps, logger=False, callbacks=[callback],
                         accumulate_grad_batches=accumulate,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tempfile.mkdtemp(prefix="ce_guard_mtp_"))
    module = Kept(mtp_num_layers=1, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, next_token_loader(batches=steps * dp * accumulate))
    return {"history": [(h["variant"], h["summary"]) for h in callback.history], "missed": callback.missed,
            "masks": [mask.tolist() for mask in module.masks]}  # lists: a tensor would not outlive the child


def mtp_cases(rank, world):
    """This rank's verdicts under megatron-core's own MTP code: the installed 0.16.1, or the pinned 0.19.2 with
    PR 3159's rescale."""
    import megatron.core
    from megatron.core.transformer import multi_token_prediction

    started = time.perf_counter()
    rescales = hasattr(multi_token_prediction, "process_mtp_loss")  # PR 3159: the local N/M rescale
    cases = {"per-token": _fit(world, STEPS, per_token_loss=True), "mean": _fit(world, STEPS)}
    if world == 1 and not rescales:  # Lightning divides the returned loss by the accumulation; the MTP term only
        # by its scale
        cases["mean, accumulation 2"] = _fit(world, STEPS, accumulate=2)
        cases["mean, accumulation 2, MTP scale unset"] = _fit(world, STEPS, accumulate=2, unscaled=True)
    return cases, megatron.core.__version__, time.perf_counter() - started


def _counts(results, step):
    """N (main) and M (MTP depth 1) of each rank at ``step``, from the data."""
    masks = [torch.tensor(cases["per-token"]["masks"][step], dtype=torch.float64) for cases, *_ in results]
    return [int(mask.sum()) for mask in masks], [int(_rolled(mask).sum()) for mask in masks]


def _assert_local_counts_named(variant, summary, n, m):
    """Megatron-LM issue 7452 item 3: each rank rescales by its own N_r/M_r where the group's N/M is due."""
    assert n[0] * m[1] != n[1] * m[0], (n, m)  # unequal ratios in the data
    assert variant == "window_weighting/mtp_local_count", summary
    first = next(r for r in range(len(n)) if abs(n[r] * sum(m) / (sum(n) * m[r]) - 1) > 1e-4)
    factor = n[first] * sum(m) / (sum(n) * m[first])
    assert f"{n[first]}/{m[first]} (main tokens over its own)" in summary, (summary, n, m)
    assert f"{factor:.4g}x" in summary, (summary, factor)


@pytest.mark.parametrize("version", [None, "0.19.2"], ids=["installed", "0.19.2"])
@pytest.mark.parametrize("dp", [1, 2])
def test_megatron_mtp_per_token_loss_is_named_with_its_factor(dp, version):
    """0.16.1 (issue 2417): each MTP depth divided by the main count, named with M/N. 0.19.2 (PR 3159's rescale
    by each rank's N/M): clean on one rank, named at DP = 2 with unequal counts (issue 7452 item 3)."""
    started = time.perf_counter()
    with megatron_core_for_spawned_ranks(version):
        results = run_distributed(mtp_cases, dp, timeout=300)
    found = results[0][1]
    print(f"\nmegatron-core {found}, DP={dp}: {time.perf_counter() - started:.1f} s with spawning")
    assert found.startswith(version or "0.16"), found  # the version the spawned ranks imported
    for rank, (cases, *_) in enumerate(results):
        for name, case in cases.items():
            print(f"  rank {rank} {name}: {case['history'][0]}")
            assert not case["missed"] and len(case["history"]) == STEPS, (name, case)
        assert all(v == "within_budget/clean" for v, _ in cases["mean"]["history"])
        if "mean, accumulation 2" in cases:  # the schedule's scale, 1/micro-batches, as the demo sets it: clean;
            # never set: each MTP term weighs as a whole step
            assert all(v == "within_budget/clean" for v, _ in cases["mean, accumulation 2"]["history"])
            for variant, summary in cases["mean, accumulation 2, MTP scale unset"]["history"]:
                assert variant == "loss_scaled_outside/accumulation", summary
                assert summary.startswith("MTP depth 1's loss (weight 0.1, divided out) reached the optimizer 2x"), summary
    for step in range(STEPS):
        n, m = _counts(results, step)
        assert sum(m) < sum(n)
        for cases, *_ in results:
            variant, summary = cases["per-token"]["history"][step]
            if version is None:  # 0.16.1: each MTP token weighs w/N where w/M is due
                factor = sum(m) / sum(n)
                assert variant == "window_weighting/mtp_main_count", summary
                assert f"{sum(m)}/{sum(n)} = {factor:.4g}x" in summary, (summary, n, m)
                assert "MTP depth 1's loss (weight 0.1, divided out)" in summary
            elif dp == 1:  # N/M on one rank is the group's: the rescale holds
                assert variant == "within_budget/clean", summary
            else:
                _assert_local_counts_named(variant, summary, n, m)


def term_upstream_case(rank, world):
    """One forward and backward of a bare per-token GPTModel, recorded: the MTP depth's upstream against a float64
    hand computation (w * rolled mask / N), and its step weight's factor M/N."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from ce_guard.adapters import megatron_tensor_parallel
    from ce_guard.demos.megatron_gpt import MegatronGPTLit
    from ce_guard.seams import find_seam

    mute_mtp_loss_logger()
    megatron_tensor_parallel(None)
    lit = MegatronGPTLit(mtp_num_layers=2, per_token_loss=True)
    lit.configure_model()
    seam = find_seam(lit)
    tokens = torch.randint(0, 256, (2, 16))
    mask = torch.ones(2, 16)
    mask[0, 11:] = 0
    mask[1, :3] = 0  # a prompt not counted; row 0 loses its last counted token per depth, row 1 none
    recording = seam.record()
    n = mask.sum()
    MTPLossAutoScaler.set_loss_scale(1 / n)
    losses = lit(tokens, tokens, mask)
    ((losses * mask).sum() / n).backward()
    recording.remove()
    assert recording.problem() is None and seam.model.__dict__.get("compute_language_model_loss") is None
    window = recording.window(micro_batches=1, accumulate=1, dp_size=1)
    weights = recording.term_weights(window, recording.training)
    out = []
    for depth, (term, weight) in enumerate(zip(recording.terms, weights), start=1):
        rolled = _rolled(mask.double(), depth)
        expected = 0.1 / 2 * rolled / n.double()   # mtp_loss_scaling_factor 0.1 over 2 depths, divided by N
        out.append({"max_err": float((term.upstream.double() - expected).abs().max()), "factor": weight.factor,
                    "m": int(rolled.sum()), "n": int(n), "tokens": weight.tokens, "global": weight.global_tokens,
                    "main_global": weight.term.main_global_tokens})
    return out, window.global_tokens


def test_each_mtp_depths_upstream_is_recorded_beside_the_seam():
    ((depths, main_tokens),) = run_distributed(term_upstream_case, 1, timeout=300)
    print(f"\n{depths}")
    assert main_tokens == 24  # the loss mask's count, not the targets': Megatron's padding is its mask
    for depth, d in enumerate(depths, start=1):
        assert d["max_err"] < 1e-9, d
        assert d["m"] == 24 - depth and d["tokens"] == d["global"] == d["m"] and d["main_global"] == 24, d
        assert d["factor"] == pytest.approx(d["m"] / d["n"], rel=1e-6), d
