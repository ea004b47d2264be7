"""The demo hybrid model: config validation, a train step, causality of every block kind, the output seam."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ce_guard.demos import kernels as kernels_module
from ce_guard.demos.hybrid import Block, HybridConfig, HybridLM, LinearCrossEntropy
from ce_guard.demos.kernels import uses_fla

TINY = {"vocab_size": 128, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "mamba_n_heads": 4,
        "mamba_head_dim": 8, "mamba_n_groups": 2, "mamba_d_state": 8,
        "mamba_chunk_size": 8, "max_seq_len": 64}


def _model(pattern: str = "M*-M", dtype: torch.dtype = torch.float32, **overrides) -> HybridLM:
    torch.manual_seed(0)
    config = HybridConfig(layer_pattern=pattern, **{**TINY, **overrides})
    return HybridLM(config, lambda c: LinearCrossEntropy(c.d_model, c.vocab_size)).to(dtype)


def _tokens(batch: int = 2, seq: int = 21, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_pattern_sets_layers() -> None:
    model = _model("M-M*M-")
    assert model.config.n_layers == 6
    assert [block.kind for block in model.layers] == list("M-M*M-")
    mixers = [type(block.mixer).__name__ for block in model.layers[:4]]
    assert mixers == ["Mamba2Mixer", "SwiGLU", "Mamba2Mixer", "Attention"]


@pytest.mark.parametrize(("overrides", "match"), [
    ({"layer_pattern": ""}, "at least one layer"),
    ({"layer_pattern": "M-X*"}, r"only 'M'.*\['X'\]"),
    ({"layer_pattern": "m*"}, r"\['m'\]"),
    ({"n_heads": 5}, "`n_heads` to divide `d_model`"),
    ({"n_kv_heads": 3}, "`n_kv_heads` to divide `n_heads`"),
    ({"mamba_n_groups": 3}, "`mamba_n_groups` to divide `mamba_n_heads`"),
    ({"mamba_d_state": 0}, "`mamba_d_state` to be a positive int"),
    ({"vocab_size": 12.5}, "`vocab_size` to be a positive int"),
    ({"mlp_ratio": 0.0}, "`mlp_ratio`"),
    ({"norm_eps": 0.0}, "`norm_eps`"),
    ({"kernels": "mamba"}, r"`kernels` to be one of \('auto', 'torch', 'fla'\)"),
])
def test_bad_config_raises(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        HybridConfig(**{**TINY, **overrides})


def test_forward_backward_reaches_every_parameter() -> None:
    model = _model()
    tokens = _tokens()
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100
    loss = model(tokens, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert abs(loss.item() - torch.log(torch.tensor(128.0)).item()) < 0.5  # ~uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_output_seam_receives_final_hidden() -> None:
    """The model hands ``output`` exactly ``forward_hidden`` and the targets, and returns its loss as is."""

    class Recorder(nn.Module):
        def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            self.seen = (hidden, targets)
            return hidden.sum()

    torch.manual_seed(0)
    model = HybridLM(HybridConfig(layer_pattern="M*", **TINY), Recorder())
    tokens, targets = _tokens(), _tokens(seed=2)
    loss = model(tokens, targets)
    hidden, seen_targets = model.output.seen
    assert hidden.shape == (2, 21, TINY["d_model"]) and seen_targets is targets
    torch.testing.assert_close(hidden, model.forward_hidden(tokens), rtol=0, atol=0)
    torch.testing.assert_close(loss, hidden.sum(), rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["M", "*", "-", "M*-M"])
def test_causal(pattern: str) -> None:
    """Changing token t leaves every hidden state before t untouched and changes the one at t."""
    model = _model(pattern, torch.float64)
    tokens = _tokens(seq=21)
    with torch.no_grad():
        before = model.forward_hidden(tokens)
        for t in (0, 8, 13, 20):  # inside the first chunk, on a chunk boundary, mid-chunk, the last token
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % TINY["vocab_size"]
            after = model.forward_hidden(changed)
            torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-12)
            assert (after[:, t] - before[:, t]).abs().max() > 1e-6


def test_mamba_block_is_causal_on_its_own() -> None:
    """Not masked by a later layer: perturb the input of a single Mamba block at position t."""
    torch.manual_seed(0)
    block = Block(HybridConfig(**TINY), "M").double()
    x = torch.randn(2, 21, TINY["d_model"], dtype=torch.float64)
    changed = x.clone()
    changed[:, 11] += 1.0
    with torch.no_grad():
        y, y_changed = block(x), block(changed)
    torch.testing.assert_close(y_changed[:, :11], y[:, :11], rtol=0, atol=1e-12)
    assert (y_changed[:, 11:] - y[:, 11:]).abs().amax(dim=-1).min() > 0  # information flows forward


def test_joint_xbc_conv_is_the_three_convs_then_silu() -> None:
    """One depthwise conv over the joined x, B and C channels is each one's own conv (and its SiLU)."""
    torch.manual_seed(0)
    mixer = Block(HybridConfig(**TINY), "M").mixer.double()
    parts = [torch.randn(2, 21, conv.weight.shape[0], dtype=torch.float64, requires_grad=True)
             for conv in (mixer.conv_x, mixer.conv_B, mixer.conv_C)]
    joint = mixer._conv_silu(torch.cat(parts, dim=-1), use_fla=False)
    alone = torch.cat([F.silu(conv(part)) for conv, part in zip((mixer.conv_x, mixer.conv_B, mixer.conv_C), parts)],
                      dim=-1)
    torch.testing.assert_close(joint, alone, rtol=0, atol=1e-14)
    upstream = torch.randn_like(joint)
    leaves = [*parts, *mixer.parameters()]
    grads = torch.autograd.grad((joint * upstream).sum(), leaves, allow_unused=True)
    grads_alone = torch.autograd.grad((alone * upstream).sum(), leaves, allow_unused=True)
    for grad, grad_alone in zip(grads, grads_alone):
        assert (grad is None) == (grad_alone is None)
        if grad is not None:
            torch.testing.assert_close(grad, grad_alone, rtol=0, atol=1e-13)


def test_bf16_forward_backward() -> None:
    model = _model(dtype=torch.bfloat16)
    loss = model(_tokens(), _tokens(seed=2))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_output_layer_receives_the_autocast_dtype() -> None:
    """Autocast leaves the final norm in fp32; a fused output layer (no autocast inside) must get bf16."""
    model = _model()
    seen = []
    model.output.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    model(_tokens(), _tokens(seed=2))
    with torch.autocast("cpu", torch.bfloat16):
        model(_tokens(), _tokens(seed=2))
    assert seen == [torch.float32, torch.bfloat16]


def test_too_long_sequence_raises() -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        _model().forward_hidden(_tokens(seq=65))


def test_auto_kernels_run_plain_pytorch_off_cuda() -> None:
    """The CPU path is the plain scan whatever ``kernels`` says short of 'fla': same numbers as 'torch'."""
    ids = _tokens()
    losses = {kernels: _model("M*", kernels=kernels)(ids, ids) for kernels in ("auto", "torch")}
    assert not uses_fla("auto", torch.device("cpu"))
    torch.testing.assert_close(losses["auto"], losses["torch"], rtol=0, atol=0)


def test_fla_kernels_refuse_what_they_cannot_run(monkeypatch) -> None:
    with pytest.raises(ValueError, match="Expected a CUDA device for kernels='fla'"):
        uses_fla("fla", torch.device("cpu"))
    monkeypatch.setattr(kernels_module, "fla_installed", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'ce_guard\[gpu\]'"):
        _model("M*", kernels="fla")
