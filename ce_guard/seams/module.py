"""A module that declares ``ce_contract``: called ``module(hidden, targets) -> loss``, holding the head's weight.

This is the seam of ce_guard's own fused layer and of the adapters; a user's wrapper qualifies too, as long as
its forward takes the targets and its weight can be found (its own parameter, one it borrows from a submodule,
or the one parameter shaped like the vocabulary slice).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ce_guard.contract import CEContract
from ce_guard.recording import SeamRecording, local_weight
from ce_guard.seams.refusal import ONE_LINE, SeamRefused


class ModuleSeam:
    """Hooks on ``module``'s first forward after :meth:`record` (and that forward's backward)."""

    def __init__(self, module: nn.Module, name: str = "") -> None:
        self.module, self.name = module, name or type(module).__name__
        self.contract: CEContract = module.ce_contract
        label = f"`{self.name}` ({type(module).__name__})"
        if not _takes_targets(module):
            raise SeamRefused(f"{label} declares `ce_contract` but its forward does not take the targets: a"
                              " guarded module is called as `module(hidden, targets)` and returns the loss. Where"
                              f" the loss is computed outside the head, declare the seam there: {ONE_LINE}")
        self.weight_name = _weight_name(module, self.contract)
        if self.weight_name is None and not torch.is_tensor(getattr(module, "weight", None)):
            raise SeamRefused(f"{label} declares `ce_contract` but holds no weight of the vocabulary slice's shape"
                              f" ([{self.contract.vocab_slice_size}, hidden]); give it the head's weight as"
                              " `self.weight = lm_head.weight`, or declare the seam in your loss code:"
                              f" {ONE_LINE}")

    def describe(self) -> str:
        return f"`{self.name}` ({type(self.module).__name__})"

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight if self.weight_name is None else self.module.get_parameter(self.weight_name)

    def record(self) -> SeamRecording:
        recording = SeamRecording()
        state: dict[str, torch.Tensor] = {}

        def before(module, args, kwargs) -> None:
            if recording.wants_tensors:
                state["weight"] = local_weight(self.weight).detach().clone()  # FSDP frees it after forward
                if hasattr(module, "checksum_inputs"):  # a loss path that can say whether it wrote into its inputs
                    module.checksum_inputs = True
                    recording.input_checksums = lambda: module.input_checksums

        def after(module, args, kwargs, output) -> None:
            targets = args[1] if len(args) > 1 else kwargs.get("targets")
            recording.count(targets, self.contract.ignore_index)
            if "weight" not in state:
                return
            hidden = args[0] if args else kwargs.get("hidden")
            if hasattr(module, "checksum_inputs"):
                module.checksum_inputs = False
            recording.capture(hidden=hidden, weight=state.pop("weight"), targets=targets, loss=output,
                              contract=self.contract, replay=self._replay_or_none())

        recording.keep(self.module.register_forward_pre_hook(recording.guard(before), with_kwargs=True))
        recording.keep(self.module.register_forward_hook(recording.guard(after), with_kwargs=True))
        return recording

    def _replay_or_none(self):
        """The module's forward on a weight copy; None where the weight is a DTensor (FSDP-sharded: a replay
        would run FSDP's collectives on one rank's schedule) or no parameter of the module (nothing to swap)."""
        if self.weight_name is None or hasattr(self.weight, "placements"):
            return None
        return lambda hidden, weight, targets: _forward_with_weight(self.module, self.weight, weight, hidden, targets)


def find_guarded_module(root: nn.Module, module_path: str | None = None) -> nn.Module:
    """The module whose seam is guarded: the one at ``module_path``, else the unique one with ``ce_contract``."""
    if module_path is not None:
        try:
            module = root.get_submodule(module_path)
        except AttributeError as err:
            raise SeamRefused(f"`module_path={module_path!r}` names no submodule ({err}).") from err
        if not isinstance(getattr(module, "ce_contract", None), CEContract):
            raise SeamRefused(f"`{module_path}` ({type(module).__name__}) declares no `ce_contract`; wrap it in a"
                              " ce_guard adapter, set `module.ce_contract = CEContract(...)` on a module called as"
                              f" `module(hidden, targets)`, or declare the seam in your loss code: {ONE_LINE}")
        return module
    found = declaring_modules(root)
    if not found:
        raise SeamRefused("no module declares a `ce_contract` (a CEContract). Use"
                          " ce_guard.fused.FusedLinearCrossEntropy or an adapter from ce_guard.adapters, or pass"
                          " `module_path=`.")
    if len(found) > 1:
        raise SeamRefused(f"several modules declare a `ce_contract`: {[n for n, _ in found]}; pass"
                          " `module_path=` to choose one.")
    return found[0][1]


def declaring_modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in root.named_modules() if isinstance(getattr(m, "ce_contract", None), CEContract)]


def _takes_targets(module: nn.Module) -> bool:
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return True  # a forward we cannot inspect is given the benefit of the doubt; the first check will tell
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _weight_name(module: nn.Module, contract: CEContract) -> str | None:
    """The name of the head's weight among ``module``'s parameters (tied and borrowed ones included):
    ``module.weight`` where it is one, else the one 2-D parameter with the vocabulary slice's rows; None
    where ``module.weight`` is a tensor from elsewhere or no parameter qualifies."""
    params = list(module.named_parameters(remove_duplicate=False))
    declared = getattr(module, "weight", None)
    for name, param in params:
        if declared is not None and param is declared:
            return name
    if declared is not None:
        return None
    shaped = {id(p): n for n, p in params if p.dim() == 2 and p.shape[0] == contract.vocab_slice_size}
    return next(iter(shaped.values())) if len(shaped) == 1 else None


def _forward_with_weight(module: nn.Module, original: torch.Tensor, weight: torch.Tensor, hidden, targets):
    """``module.forward`` with every reference to the parameter ``original`` inside it (ties included) swapped
    for ``weight``, restored after. ``forward`` is called directly: the recorded inputs are what it received,
    after any hooks (e.g. a sequence gather of ``parallelize_module``), so running those again would transform
    them twice."""
    holders = [m for m in module.modules() for p in m._parameters.values() if p is original]
    names = [next(k for k, p in m._parameters.items() if p is original) for m in holders]
    try:
        for holder, name in zip(holders, names, strict=True):
            holder._parameters[name] = weight
        return module.forward(hidden, targets)
    finally:
        for holder, name in zip(holders, names, strict=True):
            holder._parameters[name] = original
