"""Record one forward and backward of the guarded module as a :class:`~ce_guard.check.SeamRecord`; no Trainer.

Hooks on the module capture what training actually used on one micro-batch (hidden states, targets, the
weight slice, the fused loss, the upstream gradient and dL/dhidden from the real backward); dL/dW is replayed
on the recorded inputs, so training's ``.grad`` is never read or touched.

Example::

    recording = SeamRecording(model.output)
    model(tokens, targets).backward()
    recording.remove()
    result = check_seam(recording.to_record(replay_weight_grad=True), model.output.ce_contract)
"""

from __future__ import annotations

import torch
from torch import nn

from ce_guard.check import SeamRecord
from ce_guard.contract import CEContract
from ce_guard.parity import SeamOutputs


class SeamRecording:
    """Hooks on ``module`` for its first forward (and that forward's backward) after construction.

    ``module`` is called as ``module(hidden, targets)`` and has a ``weight`` (V, D); later forwards are
    ignored. Call :meth:`remove` once the backward has run.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.hidden: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.grad_hidden: torch.Tensor | None = None
        self.upstream: torch.Tensor | None = None
        self.autocast_dtype: torch.dtype | None = None
        self.finished_forward = False
        self._handles = [module.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                         module.register_forward_hook(self._post_forward, with_kwargs=True)]

    def _pre_forward(self, module, args, kwargs) -> None:
        if self.finished_forward:
            return
        # Clone now: FSDP frees the unsharded weight after forward.
        self.weight = _local_weight(module).detach().clone()

    def _post_forward(self, module, args, kwargs, output) -> None:
        if self.finished_forward:
            return
        hidden = args[0] if args else kwargs.get("hidden")
        targets = args[1] if len(args) > 1 else kwargs.get("targets")
        self.hidden, self.targets = hidden.detach(), targets.detach()
        self.loss = output.detach()
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            self.autocast_dtype = torch.get_autocast_dtype(device_type)
        if hidden.requires_grad:
            self._handles.append(hidden.register_hook(self._capture_grad_hidden))
        if output.requires_grad:
            self._handles.append(output.register_hook(self._capture_upstream))
        self.finished_forward = True

    def _capture_grad_hidden(self, grad: torch.Tensor) -> None:
        self.grad_hidden = grad.detach().clone()

    def _capture_upstream(self, grad: torch.Tensor) -> None:
        self.upstream = grad.detach().clone()

    def remove(self) -> None:
        """Remove every hook this recording put on the module and its tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def problem(self) -> str | None:
        """Why this recording cannot be checked, or None."""
        if self.hidden is None:
            return "the guarded module did not run on this micro-batch"
        if self.upstream is None or self.grad_hidden is None:
            return ("no backward reached the guarded module's output and input (was the fused loss part of the"
                    " returned loss, and does hidden require grad?)")
        return None

    def to_record(self, replay_weight_grad: bool) -> SeamRecord:
        """The recorded seam; with ``replay_weight_grad``, dL/dW from a replay of the module's forward."""
        grad_weight = _replay_weight_grad(self.module, self.hidden, self.weight, self.targets, self.upstream,
                                          self.autocast_dtype) if replay_weight_grad else None
        dtype = self.autocast_dtype or self.hidden.dtype  # what the fused matmul actually consumed
        upstream = self.upstream if self.upstream.numel() > 1 else float(self.upstream)
        fused = SeamOutputs(loss=self.loss.float(), grad_hidden=self.grad_hidden, grad_weight=grad_weight)
        return SeamRecord(hidden=self.hidden.to(dtype), weight=self.weight.to(dtype), targets=self.targets,
                          fused=fused, upstream=upstream)


def find_guarded_module(root: nn.Module, module_path: str | None = None) -> nn.Module:
    """The module whose seam is guarded: the one at ``module_path``, else the unique one with ``ce_contract``."""
    if module_path is not None:
        try:
            module = root.get_submodule(module_path)
        except AttributeError as err:
            raise ValueError(f"CEParityCallback: `module_path={module_path!r}` names no submodule ({err}).") from err
        if not isinstance(getattr(module, "ce_contract", None), CEContract):
            raise ValueError(f"CEParityCallback: `{module_path}` ({type(module).__name__}) declares no `ce_contract`;"
                             " wrap it in a ce_guard adapter or set `module.ce_contract = CEContract(...)`.")
        return module
    found = [(name, m) for name, m in root.named_modules() if isinstance(getattr(m, "ce_contract", None), CEContract)]
    if not found:
        raise ValueError("CEParityCallback found no module that declares a `ce_contract` (a CEContract). Use"
                         " ce_guard.fused.FusedLinearCrossEntropy or an adapter from ce_guard.adapters, or pass"
                         " `module_path=`.")
    if len(found) > 1:
        raise ValueError(f"CEParityCallback found several modules with a `ce_contract`: {[n for n, _ in found]};"
                         " pass `module_path=` to choose one.")
    return found[0][1]


def _local_weight(module: nn.Module) -> torch.Tensor:
    """This rank's weight slice as a plain tensor; a DTensor (fully_shard, parallelize_module) is gathered
    over its mesh, which costs nothing when it is already replicated."""
    weight = module.weight
    full_tensor = getattr(weight, "full_tensor", None)
    return full_tensor() if full_tensor is not None else weight


def _replay_weight_grad(module, hidden, weight, targets, upstream, autocast_dtype) -> torch.Tensor | None:
    """dL/dW of the fused module on the recorded inputs, by running its ``forward`` again on a weight copy.

    The module's own parameter is swapped for the copy for the duration, so training's ``.grad`` is untouched.
    ``forward`` is called directly: the recorded inputs are what the module's forward received, after any
    hooks (e.g. a sequence gather that ``parallelize_module`` put in front of it), so running the hooks again
    would transform them twice. Skipped (None) when the weight is a DTensor (FSDP-sharded).
    """
    if hasattr(module.weight, "placements"):
        return None
    original = module._parameters.get("weight")
    if original is None:
        return None
    replay = nn.Parameter(weight.clone())
    module._parameters["weight"] = replay
    try:
        with torch.enable_grad(), torch.autocast(hidden.device.type, dtype=autocast_dtype or torch.float32,
                                                 enabled=autocast_dtype is not None):
            loss = module.forward(hidden.detach(), targets)
            (grad_weight,) = torch.autograd.grad(loss, [replay], grad_outputs=upstream.to(loss.dtype).expand_as(loss))
    finally:
        module._parameters["weight"] = original
    return grad_weight
