"""Break the seam mid-run, for demonstrations: watch the parity panels go from clean to drift."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

from ce_guard.callbacks import find_guarded_module
from ce_guard.testing import LAYER_FAULTS, FaultyFusedLinearCrossEntropy


class InjectSeamFault(Callback):
    """From optimizer step ``step`` on, the guarded output layer computes ``fault`` on the same weight.

    The layer is replaced by a :class:`~ce_guard.testing.FaultyFusedLinearCrossEntropy` that shares its
    weight (so the optimizer state carries on) and keeps declaring the honest contract.

    Args:
        step: the first optimizer step that computes the fault.
        fault: one of ``ce_guard.testing.LAYER_FAULTS``.
        fault_scale: the k of ``grad_scale``.
    """

    def __init__(self, step: int, fault: str, fault_scale: int = 2) -> None:
        if step < 0:
            raise ValueError(f"`step` must be >= 0, got {step}.")
        if fault not in LAYER_FAULTS:
            raise ValueError(f"`fault` must be one of {list(LAYER_FAULTS)}, got {fault!r}.")
        self.step, self.fault, self.fault_scale = step, fault, fault_scale

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        old = find_guarded_module(pl_module)
        name = next(n for n, m in pl_module.named_modules() if m is old)
        parent, _, attr = name.rpartition(".")
        new = FaultyFusedLinearCrossEntropy(old.hidden_size, old.ce_contract, weight=old.weight,
                                            token_chunk=old.token_chunk, fault=self.fault,
                                            fault_scale=self.fault_scale)
        setattr(pl_module.get_submodule(parent) if parent else pl_module, attr, new)


class InjectCausalLMFault(Callback):
    """From optimizer step ``step`` on, the Hugging Face causal LM at ``model_path`` commits ``fault`` in its own
    loss code (:func:`ce_guard.testing.causal_lm_faults.break_causal_lm`); its config, and so the contract the
    guard reads, stays honest."""

    def __init__(self, step: int, fault: str, model_path: str = "model") -> None:
        from ce_guard.testing.causal_lm_faults import CAUSAL_LM_FAULTS

        if step < 0:
            raise ValueError(f"`step` must be >= 0, got {step}.")
        if fault not in CAUSAL_LM_FAULTS:
            raise ValueError(f"`fault` must be one of {list(CAUSAL_LM_FAULTS)}, got {fault!r}.")
        self.step, self.fault, self.model_path = step, fault, model_path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from ce_guard.testing.causal_lm_faults import break_causal_lm

        if trainer.global_step == self.step and batch_idx % trainer.accumulate_grad_batches == 0:
            break_causal_lm(pl_module.get_submodule(self.model_path), self.fault)


class InjectTrainingFault(Callback):
    """From optimizer step ``step`` on, the loss that reaches backward is multiplied as the training loop's
    ``fault`` would (:mod:`ce_guard.testing.training_faults`): the seam stays exact, the step's weight does not."""

    def __init__(self, step: int, fault: str) -> None:
        from ce_guard.testing.training_faults import TRAINING_FAULTS

        if step < 0:
            raise ValueError(f"`step` must be >= 0, got {step}.")
        if fault not in TRAINING_FAULTS:
            raise ValueError(f"`fault` must be one of {list(TRAINING_FAULTS)}, got {fault!r}.")
        self.step, self.fault = step, fault

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        from ce_guard.testing.training_faults import training_fault_factor

        if trainer.global_step >= self.step:
            loss.mul_(training_fault_factor(self.fault, trainer.accumulate_grad_batches))  # recorded by autograd
