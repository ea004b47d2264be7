"""Where the guard finds the seam it records: three ways in, one recording.

- :class:`ModuleSeam`: a module that declares ``ce_contract`` (ce_guard's fused layer, an adapter, your wrapper);
- :class:`~ce_guard.seams.causal_lm.CausalLMSeam`: a Hugging Face causal LM, unchanged (needs transformers);
- :class:`~ce_guard.seams.megatron.MegatronSeam`: a megatron-core ``GPTModel`` or ``MambaModel``, unchanged;
- :func:`seam`: one line in your own loss code.

:func:`find_seam` picks one for a LightningModule, or refuses with one sentence saying what the guard needs.
"""

from __future__ import annotations

import sys
from typing import Protocol

from torch import nn

from ce_guard.contract import CEContract
from ce_guard.recording import SeamRecording
from ce_guard.seams.declared import DeclaredSeam, seam
from ce_guard.seams.module import ModuleSeam, declaring_modules, find_guarded_module
from ce_guard.seams.refusal import ONE_LINE, SeamRefused

__all__ = ["DeclaredSeam", "ModuleSeam", "Seam", "SeamRefused", "find_guarded_module", "find_seam", "seam"]


class Seam(Protocol):
    contract: CEContract | None  # None until a declared seam's call has run

    def describe(self) -> str: ...

    def record(self) -> SeamRecording: ...


def find_seam(root: nn.Module, module_path: str | None = None) -> Seam:
    """The seam to guard in ``root``: the module at ``module_path``; else the one module declaring
    ``ce_contract``; else the one Hugging Face causal LM or megatron-core language model; else the
    ``ce_guard.seam(...)`` call in the loss code (verified on the first check step)."""
    if module_path is not None:
        module = _submodule(root, module_path)
        if getattr(module, "ce_contract", None) is None and (model_seam := _model_seam(module, module_path)):
            return model_seam
        return ModuleSeam(find_guarded_module(root, module_path), module_path)
    declared = declaring_modules(root)
    if len(declared) == 1:
        return ModuleSeam(declared[0][1], declared[0][0])
    if len(declared) > 1:
        find_guarded_module(root)  # refuses, naming them
    models = _outermost([(name, m) for name, m in root.named_modules() if _is_causal_lm(m) or _is_megatron_lm(m)])
    if len(models) > 1:
        raise SeamRefused(f"several language models: {[n for n, _ in models]}; pass `module_path=` to choose one.")
    if models:
        return _model_seam(models[0][1], models[0][0])
    return DeclaredSeam()


def _model_seam(module: nn.Module, name: str) -> Seam | None:
    """The seam of a whole model the guard knows (a Hugging Face causal LM, a megatron-core language model)."""
    if _is_causal_lm(module):
        from ce_guard.seams.causal_lm import CausalLMSeam

        return CausalLMSeam(module, name)
    if _is_megatron_lm(module):
        from ce_guard.seams.megatron import MegatronSeam

        return MegatronSeam(module, name)
    return None


def no_declared_call(root: nn.Module) -> str:
    """The refusal when nothing else was found and the first check step ran no ``ce_guard.seam(...)`` call."""
    return (f"nothing to guard in {type(root).__name__}: no submodule declares `ce_contract`, it holds no Hugging Face"
            f" causal LM or megatron-core language model, and its first training step called no"
            f" `ce_guard.seam(...)`. Add one line where the loss is computed: {ONE_LINE}")


def _submodule(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise SeamRefused(f"`module_path={path!r}` names no submodule ({err}).") from err


def _is_causal_lm(module: nn.Module) -> bool:
    """Only where transformers is already imported: a model of it means it is."""
    if "transformers" not in sys.modules:
        return False
    from ce_guard.seams.causal_lm import is_causal_lm

    return is_causal_lm(module)


def _is_megatron_lm(module: nn.Module) -> bool:
    """Only where megatron-core is already imported: a GPTModel or MambaModel of it means it is."""
    if "megatron.core" not in sys.modules:
        return False
    from ce_guard.seams.megatron import is_megatron_lm

    return is_megatron_lm(module)


def _outermost(named: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in named if not any(n.startswith(f"{o}.") for o, _ in named if o != n and o)]
