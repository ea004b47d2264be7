"""Liger-Kernel's fused linear-CE under per-token upstream weights, held to the installed version (docs/faults.md
row 16).

Up to 0.8.1, ``LigerFusedLinearCrossEntropyFunction`` computed dL/dh and dL/dW in forward, unweighted, and its
backward multiplied them by the upstream gradient with ``element_mul_kernel``, which loads one scalar,
``tl.load(grad_output_ptr)``: under ``reduction="none"`` every token's gradient carried ``grad_output[0]`` (Liger-Kernel
issue 968; with a masked first token every gradient is 0). 0.8.2 defers the gradients of ``reduction="none"`` to
backward, recomputes the chunked logits there, and multiplies each row of the logit gradient by its own
``grad_output`` before the projections sum over tokens. So the guard must name ``upstream_broadcast/first_token``
below 0.8.2 and find nothing from 0.8.2 on.

The cases are ``benchmarks/liger_per_token_pins.py``'s (fp32 and bf16, the first token visible or masked), which
prints their evidence as JSON. Needs CUDA and ``liger_kernel``; run on the device machine with a pinned wheel.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
pytest.importorskip("liger_kernel", reason="needs liger_kernel (pip install liger-kernel==0.8.1 or 0.8.2)")

from packaging.version import Version

_spec = importlib.util.spec_from_file_location(
    "liger_per_token_pins", Path(__file__).resolve().parents[1] / "benchmarks" / "liger_per_token_pins.py")
pins = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pins)

FIXED = Version("0.8.2")  # the first release that applies each token's upstream gradient to its own row
# The applied weights' spread, in units of the upstream's: the fused dL/dh's rounding (bf16 read 1.1e-3 under
# Triton's CPU interpreter, N = 512).
FIT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
# The applied weight over grad_output[0]: 1 but for the common factor a path rounds its dL/dh by (Liger's bf16 dL/dh
# read 0.993-0.996 of the reference's under the interpreter, within the bf16 budget of about 1.4%).
SCALE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("first_masked", [False, True], ids=["first_visible", "first_masked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_liger_per_token_weights_are_named_below_0_8_2_and_clean_from_it(dtype, first_masked):
    version = Version(pins.liger_version())
    result, upstream = pins.check_case(dtype, first_masked=first_masked)
    d = result.diagnosis
    if version >= FIXED:
        assert d.variant == "within_budget/clean", (str(version), d.summary)
        return
    assert d.variant == "upstream_broadcast/first_token", (str(version), d.summary)
    first = float(upstream.reshape(-1)[0])
    assert d.evidence["upstream_first_weight"] == first and (first == 0) == first_masked
    assert d.evidence["upstream_first_residual"] < FIT_TOLERANCE[dtype], d.evidence
    assert abs(d.evidence["upstream_first_scale"] - 1) < SCALE_TOLERANCE[dtype], d.evidence
    assert d.evidence["upstream_own_residual"] > 1.0
