"""Deliberately broken seams, for demonstrations and tests; ce_guard's core (the layer, the reference, the
check and the callbacks) never imports them, only the demos and ``ce-guard parity``'s fault configs do.

:data:`~ce_guard.testing.injections.INJECTIONS` is the one table of the faults that can be injected
(switch, expected cause and variant, meshes, dtypes, catalogue entry);
:class:`FaultyFusedLinearCrossEntropy` commits its layer rows while declaring the honest contract.
"""

from ce_guard.testing.faulty_layer import (
    LAYER_FAULTS,
    FaultyFusedLinearCrossEntropy,
    faulty_chunk_math,
    fused_layer,
)
from ce_guard.testing.injections import INJECTIONS, Injection, injection

__all__ = ["INJECTIONS", "LAYER_FAULTS", "FaultyFusedLinearCrossEntropy", "Injection", "faulty_chunk_math",
           "fused_layer", "injection"]
