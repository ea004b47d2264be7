"""flash-linear-attention's fused linear cross-entropy and ``l2_warp`` out of a pinned ``fla-core`` wheel, several
versions in one process.

Each wheel (pure Python, py3-none-any) is unzipped once into ``.pins/fla/fla-core-<X>/``. Loading a version
imports ``fla.modules.fused_linear_cross_entropy`` and ``fla.modules.l2warp`` from that directory with the
packages ``fla``, ``fla.modules``, ``fla.ops`` and ``fla.ops.utils`` as bare stubs (their ``__init__`` is not run:
0.5.0's ``fla.ops`` builds every attention kernel at import and one autotune key there is refused by Triton 3.9).
Then every ``fla.*`` entry is taken out of ``sys.modules`` again, so the next version imports its own files; the
loaded functions keep their own modules' globals.

On a CPU, under ``TRITON_INTERPRET=1`` (set before Triton is imported; tests/conftest.py does), the kernels run in
Triton's interpreter; ``fla.utils`` warns that it rolls back to the CPU. One thing is lifted there: 0.5.0's
``input_guard`` enters ``torch.cpu.device(index)``, which torch 2.13 lacks, so its ``custom_device_ctx`` becomes a
no-op. Nothing else is edited.

The wheels come from ``tests/pins/fla.txt`` (tests/pins/install.sh downloads them into ``.pins/fla``); a test asks
:func:`fla_or_skip` and is skipped, with the missing file named, without them.
"""

from __future__ import annotations

import contextlib
import importlib
import pathlib
import sys
import types
import zipfile

import torch
from pinned_files import PINNED_DIR, pinned_or_skip

WHEELS = PINNED_DIR / "fla"
STUBS = ("fla", "fla.modules", "fla.ops", "fla.ops.utils")
_loaded: dict[str, types.SimpleNamespace] = {}


def wheel_path(version: str) -> pathlib.Path:
    return WHEELS / f"fla_core-{version}-py3-none-any.whl"


def fla_or_skip(version: str) -> types.SimpleNamespace:
    """``FusedLinearCrossEntropyLoss`` and ``l2_warp`` of ``version``; the test is skipped without its wheel."""
    pinned_or_skip(wheel_path(version))
    return load(version)


def load(version: str) -> types.SimpleNamespace:
    """The version's ``FusedLinearCrossEntropyLoss`` and ``l2_warp``, loaded once per process."""
    if version not in _loaded:
        _loaded[version] = _load(version)
    return _loaded[version]


def _unpacked(version: str) -> pathlib.Path:
    target = WHEELS / f"fla-core-{version}"
    if not (target / "fla").is_dir():
        with zipfile.ZipFile(wheel_path(version)) as wheel:
            wheel.extractall(target)
    return target


def _load(version: str) -> types.SimpleNamespace:
    root = _unpacked(version) / "fla"
    saved = {name: module for name, module in sys.modules.items() if name == "fla" or name.startswith("fla.")}
    for name in saved:
        del sys.modules[name]
    try:
        for name in STUBS:  # bare packages whose submodules resolve inside this wheel
            stub = types.ModuleType(name)
            stub.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = stub
            if name == "fla":
                stub.__version__ = version  # fla.utils reads it at import (0.6.0)
            parent, _, leaf = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], leaf, stub)
        flce = importlib.import_module("fla.modules.fused_linear_cross_entropy")
        l2warp = importlib.import_module("fla.modules.l2warp")
        utils = sys.modules["fla.utils"]
        if not torch.cuda.is_available() and hasattr(utils, "custom_device_ctx"):
            # 0.5.0's input_guard enters torch.cpu.device(index), which torch has no more: a no-op on the CPU
            utils.custom_device_ctx = lambda index: contextlib.nullcontext()
        return types.SimpleNamespace(version=version, FusedLinearCrossEntropyLoss=flce.FusedLinearCrossEntropyLoss,
                                     l2_warp=l2warp.l2_warp)
    finally:
        for name in [n for n in sys.modules if n == "fla" or n.startswith("fla.")]:
            del sys.modules[name]
        sys.modules.update(saved)
