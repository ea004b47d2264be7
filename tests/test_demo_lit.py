"""HybridLitModule: the unsharded build, and one training step under ModelParallelStrategy on 2 gloo ranks
(DP=2 with FSDP2, TP=2 vocab-parallel) whose loss equals the one-process loss and whose seam the guard passes."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ce_guard.demos.hybrid import HybridConfig
from ce_guard.demos.lit import HybridLitModule, warmup_cosine

VOCAB, ROWS, SEQ = 256, 4, 16


def _config() -> HybridConfig:
    return HybridConfig(vocab_size=VOCAB, d_model=32, layer_pattern="M*-", n_heads=4, n_kv_heads=2,
                        mamba_n_heads=4, mamba_head_dim=8, mamba_n_groups=2, mamba_d_state=8,
                        mamba_chunk_size=8, max_seq_len=SEQ)


def _rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Four rows; rows 0 and 2 (DP rank 0's under a DistributedSampler) pad more than rows 1 and 3."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    targets[0::2, -9:] = -100
    targets[1::2, -2:] = -100
    return input_ids, targets


def _unsharded_loss(rows: slice = slice(None)) -> float:
    module = HybridLitModule(_config())
    module.configure_model()
    input_ids, targets = _rows()
    with torch.no_grad():
        return float(module(input_ids[rows], targets[rows]))


def test_unsharded_build_holds_the_whole_vocab_and_the_fault() -> None:
    module = HybridLitModule(_config(), fault="grad_scale", fault_scale=3, label_smoothing=0.1)
    module.configure_model()
    module.configure_model()  # a second call keeps the model it built
    output = module.model.output
    assert output.ce_contract.layout == "[N,V]" and output.ce_contract.is_full_vocab
    assert output.ce_contract.label_smoothing == 0.1 and output.weight.shape == (VOCAB, 32)
    assert output.fault == "grad_scale" and output.fault_scale == 3
    input_ids, targets = _rows()
    honest = HybridLitModule(_config(), label_smoothing=0.1)
    honest.configure_model()
    torch.testing.assert_close(module(input_ids, targets), 3 * honest(input_ids, targets))


def test_unknown_fault_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="`fault` to be None or one of .*'grad_scale'"):
        HybridLitModule(_config(), fault="grad_scaled")


def test_warmup_cosine_schedule() -> None:
    factor = warmup_cosine(warmup_steps=4, total_steps=104, min_ratio=0.1)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(54) == pytest.approx(0.55) and factor(104) == pytest.approx(0.1)
    assert factor(500) == pytest.approx(0.1)


def _one_step(rank: int, world: int, dp: int, tp: int, root: str) -> dict:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    from ce_guard.callbacks import CEParityCallback

    torch.set_num_threads(1)  # two ranks share two cores

    class LossSpy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.loss = float(outputs["loss"])

    # No dL/dW replay: re-running the output module would re-run apply_tp's sequence-parallel input gather
    # on hidden states that are already gathered (a (B, 2S, D) input); the dL/dh and loss checks remain.
    spy, guard = LossSpy(), CEParityCallback(every_n_steps=1)
    trainer = pl.Trainer(strategy=ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp),
                         accelerator="cpu", devices=world, max_steps=1, logger=False, callbacks=[guard, spy],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=root)
    module = HybridLitModule(_config(), warmup_steps=1, sequence_parallel=tp > 1)
    loader = DataLoader(TensorDataset(*_rows()), batch_size=ROWS // dp)
    trainer.fit(module, loader)
    contract = module.model.output.ce_contract
    return {
        "loss": spy.loss, "verdicts": [(h["step"], h["cause"]) for h in guard.history],
        "layout": contract.layout, "slice": (contract.vocab_start, contract.vocab_end),
        "normalize_by": contract.normalize_by, "token_group_size": torch.distributed.get_world_size(
            contract.token_group),
        "sharded": all(isinstance(p, DTensor) for p in module.model.layers.parameters()),
    }


def _scenarios(rank: int, world: int, root: str) -> dict:
    return {"dp": _one_step(rank, world, dp=2, tp=1, root=f"{root}/dp"),
            "tp": _one_step(rank, world, dp=1, tp=2, root=f"{root}/tp")}


@pytest.mark.distributed
def test_one_step_under_model_parallel_dp2_and_tp2_matches_one_process(tmp_path) -> None:
    from dist_helpers import run_distributed

    ranks = run_distributed(_scenarios, 2, str(tmp_path), timeout=120)
    full = _unsharded_loss()

    # DP=2 (FSDP2): each rank holds half the rows, normalised by the global non-ignored count, so the
    # losses add up to the global mean even though the ranks' counts differ.
    dp = [r["dp"] for r in ranks]
    assert all(r["layout"] == "[N,V]" and r["normalize_by"] == "global_tokens" for r in dp)
    assert all(r["token_group_size"] == 2 and r["sharded"] for r in dp)
    assert dp[0]["loss"] != pytest.approx(dp[1]["loss"])  # unequal padding: unequal shares
    assert (dp[0]["loss"] + dp[1]["loss"]) / 2 == pytest.approx(full, rel=1e-5)
    assert all(r["verdicts"] == [(0, "within_budget")] for r in dp)

    # TP=2 with sequence parallel: vocab halves, the full batch on both ranks, the same loss.
    tp = [r["tp"] for r in ranks]
    assert [r["slice"] for r in tp] == [(0, VOCAB // 2), (VOCAB // 2, VOCAB)]
    assert all(r["layout"] == "[S,B,V/TP]" and r["sharded"] for r in tp)
    assert all(r["loss"] == pytest.approx(full, rel=1e-5) for r in tp)
    assert all(r["verdicts"] == [(0, "within_budget")] for r in tp)


def _loss_and_grads(module: HybridLitModule) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.configure_model()
    loss = module(*_rows())
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in module.named_parameters()}


def test_compiled_blocks_keep_the_loss_the_gradients_and_the_state_dict_keys() -> None:
    eager_loss, eager_grads = _loss_and_grads(HybridLitModule(_config()))
    compiled = HybridLitModule(_config(), compile=True)
    loss, grads = _loss_and_grads(compiled)
    assert all(hasattr(block, "_compiled_call_impl") for block in compiled.model.layers)
    assert grads.keys() == eager_grads.keys()  # compiled in place: no `_orig_mod.` in the names
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_an_unknown_compile_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="`compile_mode` to be one of"):
        HybridLitModule(_config(), compile=True, compile_mode="fast")


def test_compile_is_refused_under_tensor_parallelism() -> None:
    from types import SimpleNamespace

    module = HybridLitModule(_config(), compile=True)
    module._device_mesh = {"tensor_parallel": SimpleNamespace(size=lambda: 2),
                           "data_parallel": SimpleNamespace(size=lambda: 1)}
    with pytest.raises(ValueError, match="`compile=False` under tensor parallelism"):
        module.configure_model()


def test_cuda_graphs_are_refused_beside_reduce_overhead_and_off_a_single_cuda_device(tmp_path) -> None:
    import lightning.pytorch as pl

    with pytest.raises(ValueError, match="`cuda_graphs=False` with compile_mode='reduce-overhead'"):
        HybridLitModule(_config(), compile=True, compile_mode="reduce-overhead", cuda_graphs=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="one CUDA device for `cuda_graphs=True`, got 1 x cpu"):
        trainer.fit(HybridLitModule(_config(), cuda_graphs=True), DataLoader(TensorDataset(*_rows()), batch_size=2))


def test_fused_adamw_clips_by_norm_under_bf16_mixed(tmp_path, monkeypatch) -> None:
    """Lightning's mixed precision refuses to clip for an optimizer that unscales in its own step (fused AdamW);
    under bf16 nothing is scaled, so the module clips as the base plugin does: the norm is taken and applied."""
    import lightning.pytorch as pl

    class FusedAdamW(HybridLitModule):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)

    clipped = []
    original = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = original(parameters, max_norm, *args, **kwargs)
        clipped.append((float(total), float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad) for p in parameters])))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=2, gradient_clip_val=0.01,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(FusedAdamW(_config()), DataLoader(TensorDataset(*_rows()), batch_size=2))
    assert len(clipped) == 2
    assert all(before > 0.01 and after == pytest.approx(0.01, rel=1e-3) for before, after in clipped)
