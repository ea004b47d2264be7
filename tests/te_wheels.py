"""Transformer Engine's ``parallel_cross_entropy`` out of a pinned wheel, several versions in one process.

The pure-Python wheel ``transformer-engine==X`` (py3-none-any) carries the cross-entropy in two files, three
from 2.10 on (the Triton kernels moved to ``transformer_engine/common/triton``); they need only torch and
triton. Each version's files are read out of its zip and executed as modules named ``_te_wheels.v<X>.*``;
while one executes, the ``transformer_engine.*`` names its absolute imports ask for point at this version's
stubs, and are taken away again after, so one version never sees another's modules.

The wheels come from ``tests/pins/transformer-engine.txt`` (the README's test command downloads them into
``.pins/wheels``); a test asks :func:`te_or_skip` and is skipped, with the missing file named, without them.

On a CPU, under ``TRITON_INTERPRET=1``, the kernels run in Triton's interpreter. 2.19 on refuses a tensor that
is not on CUDA in ``_validate_inputs``; that one check is lifted there (``cpu=True``), nothing else is edited.
"""

from __future__ import annotations

import linecache
import pathlib
import sys
import types
import zipfile
from collections.abc import Callable

import torch
from pinned_files import PINNED_DIR, ROOT, pinned_or_skip

PINS = ROOT / "tests" / "pins" / "transformer-engine.txt"
WHEELS = PINNED_DIR / "wheels"
FILES = ("transformer_engine/common/triton/cross_entropy.py",    # 2.10 on: the kernels
         "transformer_engine/pytorch/triton/cross_entropy.py",   # the launchers (and, to 2.9, the kernels)
         "transformer_engine/pytorch/cross_entropy.py")          # the autograd function and parallel_cross_entropy
CUDA_CHECK = "    if not inp.is_cuda:\n"
_loaded: dict[str, types.ModuleType] = {}


def pinned_versions() -> list[str]:
    """The versions in the pins file, in its order (``transformer-engine==X`` lines)."""
    lines = [line.split("#")[0].strip() for line in PINS.read_text().splitlines()]
    return [line.split("==")[1] for line in lines if line]


def wheel_path(version: str) -> pathlib.Path:
    return WHEELS / f"transformer_engine-{version}-py3-none-any.whl"


def te_or_skip(version: str) -> Callable[..., torch.Tensor]:
    """``parallel_cross_entropy`` of ``version``; the test is skipped when its wheel was not fetched."""
    pinned_or_skip(wheel_path(version))
    return load(version).parallel_cross_entropy


def load(version: str, *, cpu: bool | None = None) -> types.ModuleType:
    """The module ``transformer_engine.pytorch.cross_entropy`` of ``version``, loaded once per process."""
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    key = f"{version}{'-cpu' if cpu else ''}"
    if key not in _loaded:
        _loaded[key] = _load(version, key.replace(".", "_").replace("-", "_"), cpu)
    return _loaded[key]


def _load(version: str, tag: str, cpu: bool) -> types.ModuleType:
    prefix = f"_te_wheels.v{tag}"
    with zipfile.ZipFile(wheel_path(version)) as wheel:
        names = set(wheel.namelist())
        sources = {name: wheel.read(name).decode() for name in FILES if name in names}
    if FILES[2] not in sources:
        raise FileNotFoundError(f"transformer-engine {version} has no {FILES[2]} (parallel_cross_entropy came in 2.2)")
    packages = ["transformer_engine", "transformer_engine.common", "transformer_engine.common.triton",
                "transformer_engine.pytorch", "transformer_engine.pytorch.triton"]
    stubs = {name: _package(f"{prefix}.{name}") for name in packages}
    stubs["transformer_engine.pytorch.jit"] = _jit_stub(f"{prefix}.transformer_engine.pytorch.jit")
    saved = {name: sys.modules.get(name) for name in [*stubs, *(_dotted(f) for f in FILES)]}
    try:
        sys.modules.update(stubs)
        _link(stubs)
        for path in FILES:
            if path not in sources:
                continue
            source = sources[path]
            if cpu and path == FILES[2] and CUDA_CHECK in source:
                source = source.replace(CUDA_CHECK, "    if False:  # te_wheels: CPU under TRITON_INTERPRET\n")
            module = _execute(f"{prefix}.{_dotted(path)}", f"<te {version}>/{path}", source)
            sys.modules[_dotted(path)] = module
            parent, _, leaf = _dotted(path).rpartition(".")
            setattr(sys.modules[parent], leaf, module)
            sys.modules[module.__name__] = module
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    for name, stub in stubs.items():
        sys.modules[stub.__name__] = stub
    return sys.modules[f"{prefix}.{_dotted(FILES[2])}"]


def _dotted(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def _package(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = []
    return module


def _link(stubs: dict[str, types.ModuleType]) -> None:
    """Parents know their children as attributes, as ``import a.b.c as x`` needs."""
    for name, module in stubs.items():
        parent, _, leaf = name.rpartition(".")
        if parent in stubs:
            setattr(stubs[parent], leaf, module)


def _jit_stub(name: str) -> types.ModuleType:
    """``transformer_engine.pytorch.jit.no_torch_dynamo`` (2.20): upstream wraps in ``torch._dynamo.disable``."""
    module = types.ModuleType(name)

    def no_torch_dynamo(recursive: bool = True):
        return lambda fn: torch._dynamo.disable(fn, recursive=recursive)

    module.no_torch_dynamo = no_torch_dynamo
    return module


def _execute(name: str, filename: str, source: str) -> types.ModuleType:
    """Run ``source`` as module ``name``; its lines go to ``linecache`` (mtime None: never evicted) because
    ``triton.jit`` reads a kernel's source through ``inspect``."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module
