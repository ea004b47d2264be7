"""ce_guard: guard the logits-to-loss seam of a fused output layer during training."""

from ce_guard.contract import CEContract

__all__ = ["CEContract"]
__version__ = "0.1.0"
