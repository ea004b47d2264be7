"""A small hybrid Mamba-2 / attention language model (Nemotron-H style layer pattern) for the ce_guard demos.

The model ends in a pluggable output module, ``output(hidden, targets) -> loss``: that seam is what
ce_guard guards, so the model never computes logits itself. No distributed code lives here; the
tensor- and data-parallel plans are in ``parallelize.py``. Every reshape takes the head count from
the tensor (``-1``), so the same code runs on the local heads of a tensor-parallel shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ce_guard.demos import kernels as fast
from ce_guard.demos.ssd import ssd_chunked

MAMBA, ATTENTION, MLP = "M", "*", "-"
BLOCK_KINDS = (MAMBA, ATTENTION, MLP)


@dataclass(frozen=True, kw_only=True)
class HybridConfig:
    """Shape of a :class:`HybridLM`.

    Args:
        vocab_size: rows of the embedding and of the output weight; a multiple of the TP degree.
        d_model: width of the residual stream.
        layer_pattern: one character per layer, Megatron / Nemotron-H style: ``M`` a Mamba-2 block,
            ``*`` a causal GQA attention block, ``-`` an MLP block. ``"M-M*M-"`` has six layers.
        n_heads: attention query heads; divides ``d_model`` (head dim = d_model / n_heads).
        n_kv_heads: attention key/value heads; divides ``n_heads`` (grouped-query attention).
        mamba_n_heads: SSM heads; inner width = mamba_n_heads * mamba_head_dim.
        mamba_head_dim: channels per SSM head (P in the paper).
        mamba_n_groups: groups sharing one B and C projection; divides ``mamba_n_heads``.
        mamba_d_state: SSM state size per head channel (N in the paper).
        mamba_d_conv: kernel width of the short causal depthwise convolution.
        mamba_chunk_size: chunk length of the SSD scan; sequences are padded up to a multiple of it.
        mlp_ratio: hidden width of the SwiGLU MLP over ``d_model``.
        max_seq_len: longest sequence accepted. Attention has no positional encoding (as in
            Nemotron-H: the Mamba layers carry position), so this is a guard, not a table size.
        norm_eps: epsilon of every RMSNorm.
        kernels: how the Mamba-2 mixers run their scan and causal conv. ``"auto"``: flash-linear-attention's
            Triton kernels on CUDA when installed (the ``gpu`` extra), plain PyTorch otherwise; ``"torch"``:
            plain PyTorch everywhere (the CPU path and the oracle the kernels are tested against);
            ``"fla"``: the kernels, or an error where they cannot run.

    Example:
        >>> HybridConfig(vocab_size=100352, d_model=256, layer_pattern="M-M*M-").n_layers
        6
    """

    vocab_size: int
    d_model: int = 256
    layer_pattern: str = "M-M*M-"
    n_heads: int = 8
    n_kv_heads: int = 2
    mamba_n_heads: int = 8
    mamba_head_dim: int = 64  # Mamba-2's default P
    mamba_n_groups: int = 2
    mamba_d_state: int = 64
    mamba_d_conv: int = 4  # Mamba-2's default kernel width
    mamba_chunk_size: int = 64  # short: the intra-chunk matmul is (chunk x chunk) per head on CPU
    mlp_ratio: float = 4.0
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    kernels: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "mamba_n_heads", "mamba_head_dim",
                     "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_chunk_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, got {value!r}.")
        if not self.layer_pattern:
            raise ValueError("Expected `layer_pattern` to have at least one layer, e.g. 'M-M*M-', got ''.")
        unknown = sorted(set(self.layer_pattern) - set(BLOCK_KINDS))
        if unknown:
            raise ValueError(f"Expected `layer_pattern` to use only 'M' (Mamba-2), '*' (attention) and "
                             f"'-' (MLP), got {unknown} in {self.layer_pattern!r}.")
        if self.d_model % self.n_heads:
            raise ValueError(f"Expected `n_heads` to divide `d_model`, got d_model={self.d_model}, "
                             f"n_heads={self.n_heads}.")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"Expected `n_kv_heads` to divide `n_heads` (grouped-query attention), got "
                             f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}.")
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ValueError(f"Expected `mamba_n_groups` to divide `mamba_n_heads`, got "
                             f"mamba_n_heads={self.mamba_n_heads}, mamba_n_groups={self.mamba_n_groups}.")
        if self.mlp_ratio <= 0 or self.d_ff < 1:
            raise ValueError(f"Expected `mlp_ratio` to give a positive MLP width, got {self.mlp_ratio}.")
        if self.norm_eps <= 0:
            raise ValueError(f"Expected `norm_eps` > 0, got {self.norm_eps}.")
        if self.kernels not in fast.KERNELS:
            raise ValueError(f"Expected `kernels` to be one of {fast.KERNELS}, got {self.kernels!r}.")

    @property
    def n_layers(self) -> int:
        return len(self.layer_pattern)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_n_heads * self.mamba_head_dim

    @property
    def d_ff(self) -> int:
        return int(self.mlp_ratio * self.d_model)


class LinearCrossEntropy(nn.Module):
    """The unfused output layer: logits ``[B, S, V]`` in memory, then ``F.cross_entropy`` (mean over
    non-ignored targets). The baseline a fused layer replaces, and the default for tests."""

    def __init__(self, hidden_size: int, vocab_size: int, *, ignore_index: int = -100) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))
        self.ignore_index = ignore_index
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight).float()  # (B, S, V), fp32 for the softmax
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.ignore_index)


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Short causal convolution over time, one filter per channel: x (B, L, C), weight (C, width), bias (C,)."""
    seq, (channels, width) = x.shape[1], weight.shape
    y = F.conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias,  # (B, C, L + width - 1)
                 padding=width - 1, groups=channels)
    return y[..., :seq].transpose(1, 2)  # (B, L, C): drop the look-ahead tail


class CausalDepthwiseConv(nn.Module):
    """Short causal convolution over time, one filter per channel (Mamba's ``conv1d``).

    Weights are ``(channels, width)`` rather than ``nn.Conv1d``'s fixed ``groups``, so a tensor-parallel
    plan can hand this module a slice of the channels.
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, width))
        self.bias = nn.Parameter(torch.empty(channels))
        bound = 1 / math.sqrt(width)  # nn.Conv1d's default for fan_in = width
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return causal_depthwise_conv(x, self.weight, self.bias)


class GatedRMSNorm(nn.Module):
    """Mamba-2's ``RMSNormGated`` (norm after gate): ``rmsnorm(x * silu(z))`` per group of channels.

    Normalising each B/C group on its own keeps the op local to a tensor-parallel shard of groups.
    """

    def __init__(self, channels: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.group_size, self.eps = group_size, eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = (x.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))  # (B, L, G, D/G)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h.flatten(-2) * self.weight).to(x.dtype)  # (B, L, D)


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: projections, short causal conv, SSD scan, D skip, gated norm, out projection.

    Mamba-2's fused ``in_proj`` is split into ``z/x/B/C/dt`` projections so each can be sharded by
    head (or group) on its own, Megatron-style. The conv and the scan run as ``config.kernels`` says
    (``kernels.py``); the parameters are the same either way.
    """

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        d, inner, heads = config.d_model, config.mamba_d_inner, config.mamba_n_heads
        bc = config.mamba_n_groups * config.mamba_d_state
        self.head_dim, self.d_state = config.mamba_head_dim, config.mamba_d_state
        self.chunk_size, self.kernels = config.mamba_chunk_size, fast.installed_kernels(config.kernels)
        self.z_proj = nn.Linear(d, inner, bias=False)
        self.x_proj = nn.Linear(d, inner, bias=False)
        self.B_proj = nn.Linear(d, bc, bias=False)
        self.C_proj = nn.Linear(d, bc, bias=False)
        self.dt_proj = nn.Linear(d, heads, bias=False)
        self.conv_x = CausalDepthwiseConv(inner, config.mamba_d_conv)
        self.conv_B = CausalDepthwiseConv(bc, config.mamba_d_conv)
        self.conv_C = CausalDepthwiseConv(bc, config.mamba_d_conv)
        # Mamba-2's init: dt log-uniform in [1e-3, 1e-1] stored through softplus^-1, A uniform in [1, 16].
        dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm = GatedRMSNorm(inner, inner // config.mamba_n_groups, config.norm_eps)
        self.out_proj = nn.Linear(inner, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        use_fla = fast.uses_fla(self.kernels, x.device)
        z = self.z_proj(x)  # (B, S, H*P)
        x_in, B_in, C_in = self.x_proj(x), self.B_proj(x), self.C_proj(x)  # (B, S, H*P), (B, S, G*N) twice
        xBC = self._conv_silu(torch.cat([x_in, B_in, C_in], dim=-1), use_fla)
        xs, Bm, Cm = xBC.split([x_in.shape[-1], B_in.shape[-1], C_in.shape[-1]], dim=-1)
        xs = xs.view(b, s, -1, self.head_dim)  # (B, S, H, P)
        Bm, Cm = Bm.view(b, s, -1, self.d_state), Cm.view(b, s, -1, self.d_state)  # (B, S, G, N)
        dt = F.softplus(self.dt_proj(x).float() + self.dt_bias.float())  # (B, S, H), fp32 like the scan
        A = -torch.exp(self.A_log.float())  # (H,)
        if use_fla:
            y = fast.ssd_fla(xs, dt, A, Bm, Cm)  # (B, S, H, P)
        else:
            y, _ = ssd_chunked(xs, dt, A, Bm, Cm, chunk_size=self.chunk_size)
        y = y + xs * self.D[:, None].to(xs.dtype)
        return self.out_proj(self.norm(y.flatten(2), z))  # (B, S, H*P) -> (B, S, D)

    def _conv_silu(self, xBC: torch.Tensor, use_fla: bool) -> torch.Tensor:
        """x, B and C through their causal convs and SiLU as one tensor, as Mamba-2 convolves ``xBC``: the convs
        are depthwise, so joining the channels is the same math in a third of the launches (each of fla's costs
        the host more than the device at this size). Under TP each conv's weight is this rank's slice."""
        convs = (self.conv_x, self.conv_B, self.conv_C)
        weight, bias = torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs])
        if use_fla:
            return fast.causal_conv_silu(xBC, weight, bias)
        return F.silu(causal_depthwise_conv(xBC, weight, bias))


class Attention(nn.Module):
    """Causal grouped-query attention without positional encoding (Nemotron-H's attention layers)."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.n_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, Hq, S, hd)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, Hq, S, hd)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))  # (B, S, Hq*hd) -> (B, S, D)


class SwiGLU(nn.Module):
    def __init__(self, config: HybridConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One layer of the pattern: ``x + mixer(rmsnorm(x))``."""

    MIXERS = {MAMBA: Mamba2Mixer, ATTENTION: Attention, MLP: SwiGLU}

    def __init__(self, config: HybridConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = self.MIXERS[kind](config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class HybridLM(nn.Module):
    """Embedding, the pattern's blocks, a final RMSNorm, and the output module that owns the loss.

    Args:
        config: the model's shape.
        output: the output layer, ``forward(hidden [B, S, D], targets [B, S]) -> scalar loss``, or a
            factory ``config -> module``; e.g. ``ce_guard.fused.FusedLinearCrossEntropy`` or
            :class:`LinearCrossEntropy`.

    Example:
        >>> cfg = HybridConfig(vocab_size=512, d_model=64, layer_pattern="M*-")
        >>> model = HybridLM(cfg, lambda c: LinearCrossEntropy(c.d_model, c.vocab_size))
        >>> loss = model(input_ids, targets)
    """

    def __init__(self, config: HybridConfig, output: nn.Module | Callable[[HybridConfig], nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, kind) for kind in config.layer_pattern)
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.output = output if isinstance(output, nn.Module) else output(config)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's scheme: N(0, 0.02), residual-writing projections scaled by 1/sqrt(2 * n_layers)."""
        nn.init.normal_(self.tok_embeddings.weight, std=0.02)
        for name, module in self.layers.named_modules():
            if isinstance(module, nn.Linear):
                residual = name.endswith(("out_proj", "o_proj", "down_proj"))
                std = 0.02 / math.sqrt(2 * self.config.n_layers) if residual else 0.02
                nn.init.normal_(module.weight, std=std)

    def forward_hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states ``(B, S, D)``: what the output module receives."""
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"Expected sequences of at most `max_seq_len`={self.config.max_seq_len} tokens, "
                             f"got {input_ids.shape[1]}; raise `max_seq_len` in the HybridConfig.")
        h = self.tok_embeddings(input_ids)  # (B, S, D)
        for block in self.layers:
            h = block(h)
        return self.norm(h)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.forward_hidden(input_ids)
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            # Autocast runs the final norm in fp32, and a fused output layer (a custom autograd function)
            # sees no autocast: hand it the activations in the autocast dtype, as a bf16 stack does, or its
            # [tokens, vocab] matmuls run in fp32.
            hidden = hidden.to(torch.get_autocast_dtype(device))
        return self.output(hidden, targets)
