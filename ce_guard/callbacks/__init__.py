"""Lightning callbacks over a Trainer-free core: the seam's parity check, and spike attribution.

Each callback only adapts Trainer hooks: :mod:`ce_guard.seams` finds and records the seam,
:func:`ce_guard.check.check_seam` judges it, :mod:`ce_guard.agreement` makes every rank agree, and
:mod:`ce_guard.spike` keeps the spike statistics.
"""

from ce_guard.callbacks.health import SeamHealthCallback
from ce_guard.callbacks.parity import CEParityCallback
from ce_guard.drift import SeamDriftError
from ce_guard.seams import find_guarded_module

__all__ = ["CEParityCallback", "SeamDriftError", "SeamHealthCallback", "find_guarded_module"]
