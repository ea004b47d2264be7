"""Shared test setup: tests/ on sys.path for the helper modules, deterministic seeds, a small hypothesis profile.

Without CUDA, Triton kernels run under Triton's CPU interpreter. Triton reads ``TRITON_INTERPRET`` when it
defines a kernel, its own ``tl.max`` / ``tl.sum`` included, so it is set before anything imports Triton
(torch 2.13's ``F.linear_cross_entropy`` does, in test_adapters.py).
"""

import os
import sys

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
