"""Tiny Hugging Face causal LMs from configs with random weights: nothing is downloaded.

Each hybrid Mamba model transformers ships that runs on CPU (its Mamba layers on the PyTorch fallback), with
one Mamba and one attention layer, plus Llama and the models whose heads transform the logits. The head is
re-initialised wider than the default (N(0, 0.3)): at the default the logits sit near 0, the loss near ln V,
and an output transform dropped or doubled would change almost nothing a check could see.
"""

from __future__ import annotations

from typing import Any

import torch

try:
    import transformers
except ImportError as err:
    raise ImportError("The Hugging Face demo models need transformers: pip install 'ce_guard[transformers]'.") from err

HYBRIDS = ("bamba", "falcon_h1", "zamba2", "nemotron_h", "jamba", "granitemoehybrid")
TRANSFORMED = ("gemma2", "cohere", "granite")  # softcap, logit_scale, logits_scaling
ARCHITECTURES = ("llama", *HYBRIDS, *TRANSFORMED)
_MAMBA = dict(mamba_n_heads=8, mamba_d_state=16, mamba_chunk_size=16)


def _configs(vocab: int, hidden: int) -> dict[str, tuple[str, str, dict[str, Any]]]:
    """Model class, config class and fields, per architecture (transformers 5.x names)."""
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    return {
        "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_hidden_layers=2, **common)),
        "bamba": ("BambaForCausalLM", "BambaConfig", dict(num_hidden_layers=2, attn_layer_indices=[1],
                                                          z_loss_coefficient=0.01, **_MAMBA, **common)),
        "falcon_h1": ("FalconH1ForCausalLM", "FalconH1Config", dict(num_hidden_layers=2, mamba_d_ssm=2 * hidden,
                                                                    lm_head_multiplier=0.5, **_MAMBA, **common)),
        "zamba2": ("Zamba2ForCausalLM", "Zamba2Config", dict(
            num_hidden_layers=2, layers_block_type=["mamba", "hybrid"], n_mamba_heads=8, mamba_d_state=16,
            chunk_size=16, **{k: v for k, v in common.items() if k != "num_key_value_heads"})),
        "nemotron_h": ("NemotronHForCausalLM", "NemotronHConfig", dict(
            layers_block_type=["linear_attention", "full_attention"], head_dim=16, mamba_num_heads=8,
            mamba_head_dim=16, n_groups=1, ssm_state_size=16, chunk_size=16, **common)),
        "jamba": ("JambaForCausalLM", "JambaConfig", dict(
            num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
            expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=16,
            output_router_logits=True, **common)),
        "granitemoehybrid": ("GraniteMoeHybridForCausalLM", "GraniteMoeHybridConfig", dict(
            num_hidden_layers=2, layer_types=["mamba", "attention"], num_local_experts=4, num_experts_per_tok=2,
            shared_intermediate_size=hidden, logits_scaling=4.0, output_router_logits=True, **_MAMBA, **common)),
        "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(num_hidden_layers=2, head_dim=16,
                                                             final_logit_softcapping=30.0,
                                                             attn_implementation="eager", **common)),
        "cohere": ("CohereForCausalLM", "CohereConfig", dict(num_hidden_layers=2, logit_scale=0.0625, **common)),
        "granite": ("GraniteForCausalLM", "GraniteConfig", dict(num_hidden_layers=2, logits_scaling=4.0, **common)),
    }


def tiny_causal_lm(architecture: str, *, vocab: int = 512, hidden: int = 64, head_std: float = 0.3,
                   seed: int = 0, **overrides: Any) -> transformers.PreTrainedModel:
    """A random-weight ``*ForCausalLM`` of ``architecture`` (one of :data:`ARCHITECTURES`); ``overrides`` set
    config fields."""
    configs = _configs(vocab, hidden)
    if architecture not in configs:
        raise ValueError(f"`architecture` must be one of {ARCHITECTURES}, got {architecture!r}.")
    model_name, config_name, fields = configs[architecture]
    config = getattr(transformers, config_name)(**{**fields, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    torch.nn.init.normal_(model.get_output_embeddings().weight, std=head_std)
    return model
