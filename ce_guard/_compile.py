"""Run a block function compiled on CUDA and eagerly elsewhere, falling back to eager if the compiler fails.

Plumbing shared by the guard's own math (the reference's blocks, the comparison's statistics, the signature
fit): it decides how a function runs, never what it computes.
"""

from __future__ import annotations

import functools
import warnings

import torch


def compiled_on_cuda(fn, device: torch.device):
    """``fn`` compiled on CUDA: one kernel reads a block once, instead of one pass per eager op.

    A compiler failure (an Inductor bug on this torch or device) must not cost the check: ``fn`` then runs
    eagerly from there on, the same math with more passes over memory, and says so once.
    """
    return fn if device.type != "cuda" or fn in _COMPILE_FAILED else functools.partial(_run_compiled, fn)


_COMPILE_FAILED: set = set()


def _run_compiled(fn, *args):
    if fn in _COMPILE_FAILED:  # failed on an earlier block of this call
        return fn(*args)
    try:
        return _compiled(fn)(*args)
    except Exception as err:  # noqa: BLE001 - any compiler error: the eager function is the fallback
        _COMPILE_FAILED.add(fn)
        warnings.warn(f"ce_guard: torch.compile failed on {fn.__name__} ({type(err).__name__}:"
                      f" {str(err)[:200]}); it runs eagerly from now on (the same math, slower checks).",
                      stacklevel=2)
        return fn(*args)


@functools.cache
def _compiled(fn):
    # Mixed row and column reductions in one kernel (Inductor's mix-order reduction) miscompile float64
    # accumulators in torch 2.11 ("Loop-carried variable ... fp32 ... re-assigned to fp64").
    return torch.compile(fn, options={"triton.mix_order_reduction": False})
