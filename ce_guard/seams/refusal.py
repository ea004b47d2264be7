"""Why a model cannot be guarded, said once at fit start with the line that fixes it."""

from __future__ import annotations

ONE_LINE = ("`loss = ce_guard.seam(hidden, lm_head.weight, targets, loss_fn, CEContract(vocab_size=V))`, where"
            " `loss_fn(hidden, weight, targets)` computes the loss (docs/integrations.md).")


class SeamRefused(ValueError):
    """The model offers no seam the guard can record; the message says what the guard needs and how to give it."""
