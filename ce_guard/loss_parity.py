"""LossParity: the fused loss against the reference over a whole validation loop, as a torchmetrics ``Metric``.

A check compares one micro-batch; a validation loop can compare every batch at the cost of one reference
forward each. Each state is a sum declared with its reduction, so the loop's result over every rank is the
token-weighted mean of each loss, whatever the batches' sizes.

Example::

    self.loss_parity = LossParity()                        # in the LightningModule's __init__
    fused = self.output(hidden, targets)                   # in validation_step
    reference = reference_linear_cross_entropy(hidden, self.output.weight, targets, contract).loss
    self.loss_parity.update(fused, reference, (targets != contract.ignore_index).sum())
    self.log("val/loss_parity", self.loss_parity)          # synced and reset at the epoch's end
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class LossParity(Metric):
    """|fused - reference| / |reference| of the token-weighted mean losses over every update on every rank.

    States (float64 sums, synced with ``dist_reduce_fx="sum"``): ``fused_sum`` and ``reference_sum``, each
    batch's mean loss times its token count, and ``tokens``. torchmetrics syncs by gathering each state from
    every rank before summing: three scalars once per loop, where a per-check sync would grow with the world
    (the checks agree through :func:`ce_guard.agreement.agree` instead).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("fused_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("reference_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, fused_loss: torch.Tensor, reference_loss: torch.Tensor, tokens: int | torch.Tensor) -> None:
        """Add one batch.

        Args:
            fused_loss: the fused path's mean loss over the batch's ``tokens`` (a scalar).
            reference_loss: the reference's mean loss on the same inputs (a scalar).
            tokens: the non-ignored tokens both means are over.

        Raises:
            ValueError: a loss is not a scalar (reduction ``none``: pass its mean).
        """
        for name, loss in (("fused_loss", fused_loss), ("reference_loss", reference_loss)):
            if loss.numel() != 1:
                raise ValueError(f"LossParity.update: `{name}` must be a scalar mean loss, got shape"
                                 f" {tuple(loss.shape)}; pass the mean over the batch's tokens.")
        count = torch.as_tensor(tokens, dtype=torch.float64, device=self.tokens.device)
        self.fused_sum += fused_loss.detach().to(torch.float64).reshape(()) * count
        self.reference_sum += reference_loss.detach().to(torch.float64).reshape(()) * count
        self.tokens += count

    def compute(self) -> torch.Tensor:
        """The relative gap of the two token-weighted mean losses (NaN before any token)."""
        fused, reference = self.fused_sum / self.tokens, self.reference_sum / self.tokens
        return (fused - reference).abs() / reference.abs().clamp_min(1e-12)
