"""Faults in a Hugging Face causal LM's own loss code: each patches one model in place, as a bug in its forward
or its ``loss_function`` would, while its config (and so the guard's contract) stays honest.

The rows of :data:`~ce_guard.testing.INJECTIONS` with ``causal_lm`` architectures are the ones implemented
here; the tests and the Hugging Face example inject them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CAUSAL_LM_FAULTS = ("grad_scale", "ignore_in_denominator", "dropped_logit_multiplier", "doubled_logit_multiplier",
                    "inverted_logit_multiplier", "dropped_softcap")
# What each multiplier mistake makes of the config's multiplier m.
_MULTIPLIER_MISTAKES = {"dropped_logit_multiplier": lambda m: 1.0, "doubled_logit_multiplier": lambda m: m * m,
                        "inverted_logit_multiplier": lambda m: 1.0 / m}


def break_causal_lm(model: nn.Module, switch: str, scale: float = 2.0) -> None:
    """Make ``model`` (a transformers ``*ForCausalLM``) commit ``switch`` from its next call on.

    The loss and multiplier faults leave the config alone; ``dropped_softcap`` changes the config field Gemma's
    forward reads, so inject it after the guard has read the contract (``InjectCausalLMFault``).
    """
    if switch == "grad_scale":  # the loss times k: a divide missing
        honest = model.loss_function
        model.loss_function = lambda *args, **kwargs: scale * honest(*args, **kwargs)
    elif switch == "ignore_in_denominator":
        model.loss_function = _mean_over_every_position
    elif switch in _MULTIPLIER_MISTAKES:  # what the forwards read; the config keeps the true value
        mistake = _MULTIPLIER_MISTAKES[switch]
        if hasattr(model, "logit_scale"):  # Cohere
            model.logit_scale = mistake(model.logit_scale)
        elif hasattr(getattr(model, "model", None), "lm_head_multiplier"):  # Falcon-H1
            model.model.lm_head_multiplier = mistake(model.model.lm_head_multiplier)
        else:
            raise ValueError(f"{type(model).__name__} applies no logit multiplier to get wrong.")
    elif switch == "dropped_softcap":
        if getattr(model.config, "final_logit_softcapping", None) is None:
            raise ValueError(f"{type(model).__name__} applies no softcap to drop.")
        model.config.final_logit_softcapping = None
    else:
        raise ValueError(f"`switch` must be one of {CAUSAL_LM_FAULTS}, got {switch!r}.")


def _mean_over_every_position(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int, ignore_index: int = -100,
                              **kwargs) -> torch.Tensor:
    """transformers' causal-LM loss with every shifted position in the divisor, ignored ones included."""
    shifted = kwargs.get("shift_labels")
    if shifted is None:
        shifted = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    per_token = F.cross_entropy(logits.float().reshape(-1, vocab_size), shifted.reshape(-1), reduction="none",
                                ignore_index=ignore_index)
    return per_token.sum() / shifted.numel()
