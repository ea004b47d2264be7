"""Megatron's multi-token prediction (MTP) losses held to the training contract, on a megatron-core GPTModel in place.

Each MTP depth's per-token loss enters the graph below the seam (``MTPLossAutoScaler``); the guard records its
upstream beside the seam and holds it to the model's training contract on the depth's own tokens (the loss mask
rolled by the depth). In megatron-core 0.16.1 with ``calculate_per_token_loss=True`` the MTP term is summed and
divided by the main loss's count N (``finalize_model_grads``), where its own M < N is due: named with M/N
(Megatron-LM issue 2417). Megatron-LM PR 3159 (not in any megatron-core release on pip) rescales it by this rank's
N/M: clean at DP = 1, named at DP = 2 with unequal counts (issue 7452, item 3). Nothing is injected: the 0.16.1
cases run megatron-core's own code; the PR 3159 case wraps its ``MTPLossAutoScaler.apply`` with that PR's rescale.
"""

import tempfile
import time
import warnings

import pytest
import torch
from dist_helpers import run_distributed

pytest.importorskip("megatron.core", reason="needs the megatron extra: pip install 'ce_guard[megatron]'")
pytestmark = pytest.mark.distributed

STEPS = 2


def _rolled(mask: torch.Tensor, depth: int = 1) -> torch.Tensor:
    """The loss mask as megatron-core's ``roll_tensor`` rolls it for MTP depth ``depth`` (one CP rank)."""
    for _ in range(depth):
        mask = torch.roll(mask, -1, -1)
        mask[..., -1] = 0
    return mask


def _pr3159():
    """Megatron-LM PR 3159's rescale, where 0.16.1 lets it in: each depth's summed loss times this micro-batch's
    N/M (``original_num_tokens / num_tokens``, local counts) before ``MTPLossAutoScaler.apply``."""
    from megatron.core.models.gpt import gpt_model
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    class Rescaled:
        mask: torch.Tensor | None = None  # the micro-batch's loss mask, set by the module before its forward
        depth = 0

        @staticmethod
        def apply(hidden, mtp_loss):
            Rescaled.depth += 1
            n, m = Rescaled.mask.sum(), _rolled(Rescaled.mask, Rescaled.depth).sum()
            return MTPLossAutoScaler.apply(hidden, mtp_loss * (n / m.clamp(min=1)))

    gpt_model.MTPLossAutoScaler = Rescaled
    return Rescaled


def _fit(dp, steps, fix=False, accumulate=1, unscaled=False, **options):
    """Fit ``MegatronGPTLit(mtp_num_layers=1, **options)`` on ``dp`` data-parallel gloo ranks (TP = 1), checking
    every step; the verdicts and this rank's loss masks. ``unscaled``: a loop that never sets the MTP scale."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from megatron.core.models.gpt import gpt_model
    from megatron.core.transformer import multi_token_prediction

    from ce_guard.callbacks import CEParityCallback
    from ce_guard.demos.megatron_gpt import MegatronGPTLit, next_token_loader

    # Megatron's MTP loss logger allocates on the CUDA device; it only logs, so on CPU it is off.
    multi_token_prediction.MTPLossLoggingHelper.save_loss_to_tracker = staticmethod(lambda *args, **kwargs: None)
    rescaled = _pr3159() if fix else None

    class Kept(MegatronGPTLit):
        def __init__(self, **options):
            super().__init__(**options)
            self.masks = []

        def forward(self, tokens, labels, loss_mask):
            if rescaled is not None:
                rescaled.mask, rescaled.depth = loss_mask.float(), 0
            return super().forward(tokens, labels, loss_mask)

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
        try:
            trainer.fit(module, next_token_loader(batches=steps * dp * accumulate))
        finally:  # the next fit in this process runs megatron-core's own code again
            gpt_model.MTPLossAutoScaler = multi_token_prediction.MTPLossAutoScaler
    return {"history": [(h["variant"], h["summary"]) for h in callback.history], "missed": callback.missed,
            "masks": [mask.tolist() for mask in module.masks]}  # lists: a tensor would not outlive the child


def mtp_cases(rank, world):
    started = time.perf_counter()
    cases = {"0.16.1 per-token": _fit(world, STEPS, per_token_loss=True),
             "0.16.1 mean": _fit(world, STEPS),
             "PR 3159 per-token": _fit(world, STEPS, fix=True, per_token_loss=True)}
    if world == 1:  # Lightning divides the returned loss by the accumulation; the MTP term only by its scale
        cases["0.16.1 mean, accumulation 2"] = _fit(world, STEPS, accumulate=2)
        cases["mean, accumulation 2, MTP scale unset"] = _fit(world, STEPS, accumulate=2, unscaled=True)
    return cases, time.perf_counter() - started


def _counts(results, step):
    """N (main) and M (MTP depth 1) over the data-parallel group at ``step``, and each rank's, from the data."""
    masks = [torch.tensor(cases["0.16.1 per-token"]["masks"][step], dtype=torch.float64) for cases, _ in results]
    n = [int(mask.sum()) for mask in masks]
    m = [int(_rolled(mask).sum()) for mask in masks]
    return n, m


@pytest.mark.parametrize("dp", [1, 2])
def test_megatron_mtp_per_token_loss_is_named_with_its_factor(dp):
    started = time.perf_counter()
    results = run_distributed(mtp_cases, dp, timeout=300)
    print(f"\nDP={dp}: {time.perf_counter() - started:.1f} s with spawning, fits {[round(s, 1) for _, s in results]} s")
    for rank, (cases, _) in enumerate(results):
        for name, case in cases.items():
            print(f"  rank {rank} {name}: {case['history'][0]}")
            assert not case["missed"] and len(case["history"]) == STEPS, (name, case)
        assert all(v == "within_budget/clean" for v, _ in cases["0.16.1 mean"]["history"])
        if dp == 1:  # the schedule's scale, 1/micro-batches, as the demo sets it: clean; never set: each MTP term
            # weighs as a whole step
            assert all(v == "within_budget/clean" for v, _ in cases["0.16.1 mean, accumulation 2"]["history"])
            for variant, summary in cases["mean, accumulation 2, MTP scale unset"]["history"]:
                assert variant == "loss_scaled_outside/accumulation", summary
                assert summary.startswith("MTP depth 1's loss (weight 0.1, divided out) reached the optimizer 2x"), summary
    for step in range(STEPS):
        n, m = _counts(results, step)
        assert sum(m) < sum(n)
        for cases, _ in results:
            variant, summary = cases["0.16.1 per-token"]["history"][step]
            factor = sum(m) / sum(n)  # float64: each MTP token weighs w/N where w/M is due
            assert variant == "window_weighting/mtp_main_count", summary
            assert f"{sum(m)}/{sum(n)} = {factor:.4g}x" in summary, (summary, n, m)
            assert "MTP depth 1's loss (weight 0.1, divided out)" in summary
            variant, summary = cases["PR 3159 per-token"]["history"][step]
            if dp == 1:  # N/M on one rank is the group's: the fix holds
                assert variant == "within_budget/clean", summary
            else:  # each rank's N/M is not the group's (7452 item 3): rank r weighs N_r/N against M_r/M
                assert n[0] * m[1] != n[1] * m[0], (n, m)  # unequal ratios in the data
                assert variant == "window_weighting/mtp_local_count", summary
                first = next(r for r in range(dp) if abs(n[r] * sum(m) / (sum(n) * m[r]) - 1) > 1e-4)
                factor = n[first] * sum(m) / (sum(n) * m[first])
                assert f"{n[first]}/{m[first]} (main tokens over its own)" in summary, (summary, n, m)
                assert f"{factor:.4g}x" in summary, (summary, factor)


def term_upstream_case(rank, world):
    """One forward and backward of a bare per-token GPTModel, recorded: the MTP depth's upstream against a float64
    hand computation (w * rolled mask / N), and its step weight's factor M/N."""
    from megatron.core.transformer import multi_token_prediction
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    from ce_guard.adapters import megatron_tensor_parallel
    from ce_guard.demos.megatron_gpt import MegatronGPTLit
    from ce_guard.seams import find_seam

    multi_token_prediction.MTPLossLoggingHelper.save_loss_to_tracker = staticmethod(lambda *args, **kwargs: None)
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
