"""The example's output layer as another package's loss (``output_layer="transformer_engine"`` or ``"fla"``):
built behind ce_guard's adapter, trained, and guarded clean at every check.

The packages' CUDA builds do not install here; their pinned pure-Python wheels (``te_wheels``, ``fla_wheels``) stand
in for the installed package, and Triton's CPU interpreter runs their kernels.
"""

from __future__ import annotations

import pytest
import torch
from fla_wheels import fla_or_skip
from lightning_helpers import trainer
from te_wheels import te_or_skip
from torch.utils.data import DataLoader, TensorDataset

from ce_guard import fla_adapter, te_adapter
from ce_guard.callbacks import CEParityCallback
from ce_guard.demos.hybrid import HybridConfig
from ce_guard.demos.lit import HybridLitModule

VOCAB, SEQ = 128, 16


def _config() -> HybridConfig:
    return HybridConfig(vocab_size=VOCAB, d_model=32, layer_pattern="M*-", n_heads=4, n_kv_heads=2,
                        mamba_n_heads=4, mamba_head_dim=8, mamba_n_groups=2, mamba_d_state=8,
                        mamba_chunk_size=8, max_seq_len=SEQ)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, VOCAB, (8, SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (8, SEQ), generator=g)
    targets[:, -3:] = -100  # padding: the mean's count is not the rows'
    return DataLoader(TensorDataset(input_ids, targets), batch_size=2)


@pytest.fixture
def installed(monkeypatch):
    """Install the pinned wheels' losses where the adapters look for the packages."""
    def install(output_layer: str) -> None:
        if output_layer == "fla":
            pinned = fla_or_skip("0.6.0")
            monkeypatch.setattr(fla_adapter, "_load", lambda module, name, owner: getattr(pinned, name))
        else:
            pce = te_or_skip("2.20.2")
            monkeypatch.setattr(te_adapter, "_load_parallel_cross_entropy", lambda owner: pce)
    return install


@pytest.mark.skipif(torch.cuda.is_available(), reason="Lightning's CPU trainer: run where Triton's interpreter runs"
                    " the wheels' kernels (the CPU suite)")
@pytest.mark.parametrize("output_layer, options", [("transformer_engine", {}), ("fla", {}),
                                                   ("fla", {"l2_warp": 0.05, "label_smoothing": 0.1})],
                         ids=["transformer_engine", "fla", "fla-l2_warp-smoothing"])
def test_the_example_trains_on_another_packages_loss_and_reads_clean(tmp_path, installed, output_layer, options):
    installed(output_layer)
    module = HybridLitModule(_config(), output_layer=output_layer, warmup_steps=1, **options)
    parity = CEParityCallback(every_n_steps=1, remind_every=10_000)
    t, _ = trainer(tmp_path, [parity], max_steps=3, logger=False)
    t.fit(module, _loader())
    contract = module.model.output.ce_contract
    assert contract.l2_warp == options.get("l2_warp", 0.0) and contract.label_smoothing == options.get(
        "label_smoothing", 0.0)
    assert [h["variant"] for h in parity.history] == ["within_budget/clean"] * 3, parity.history
    assert not parity.missed


@pytest.mark.parametrize("options, message", [
    ({"output_layer": "fla", "fault": "grad_scale"}, "no `fault` and no `z_loss`"),
    ({"output_layer": "transformer_engine", "z_loss": 1e-4}, "no `fault` and no `z_loss`"),
    ({"output_layer": "transformer_engine", "l2_warp": 1e-4}, "L2-warp penalty is flash-linear-attention's"),
])
def test_what_another_packages_loss_cannot_do_is_refused_with_the_fix(options, message):
    with pytest.raises(ValueError, match=message):
        HybridLitModule(_config(), **options)
