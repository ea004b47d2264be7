"""The walls the design rests on, held by tests instead of by comments.

- The reference shares no code with any fused path: neither imports the other, directly or through another
  module, and the only modules both reach are plumbing with no loss math (process groups, the contract, the
  rule that splits a long fp32 reduction into blocks, the 16-bit product on CPU).
- The core runs without Lightning and wandb: a plain script, a notebook or another framework's loop (the callback
  for transformers' Trainer is held to the same wall).
- Modules stay readable in one sitting: product modules under about 400 lines (diagnosis functions under about
  60: tests/test_rules.py), one callback per file of the callbacks package.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ce_guard import _matmul

PACKAGE = Path(__file__).resolve().parents[1] / "ce_guard"

# ce_guard's layer (its chunk math, its CUDA kernels), the peers' adapters, and the layer that injects faults.
FUSED_PATHS = ("ce_guard.fused", "ce_guard.fused_chunk", "ce_guard.fused_kernel", "ce_guard._triton_ce",
               "ce_guard.adapters", "ce_guard.te_adapter", "ce_guard.testing.faulty_layer")
# What the reference and a fused path may both import: no loss math lives in these (see each module's docstring).
NEUTRAL = {"ce_guard", "ce_guard._dist", "ce_guard.contract", "ce_guard._matmul"}
CORE = ("ce_guard.contract", "ce_guard.reference", "ce_guard.budget", "ce_guard.parity", "ce_guard.signature",
        "ce_guard.diagnosis", "ce_guard.check", "ce_guard.receipt", "ce_guard.bundle", "ce_guard.recording",
        "ce_guard.seams", "ce_guard.fit_summary", "ce_guard.agreement", "ce_guard.spike", "ce_guard.step_weight",
        "ce_guard.drift", "ce_guard.evidence", "ce_guard.check_options")
# Callbacks for other trainers sit on the core, never on Lightning: transformers' Trainer's.
OTHER_TRAINERS = ("ce_guard.hf_trainer",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The ce_guard modules ``name`` imports anywhere in its file (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m in MODULES}


def _closure(name: str) -> set[str]:
    """Every ce_guard module reachable from ``name`` through imports; the package ``__init__`` is not followed
    (it imports the public API, not what a module needs)."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(m for m in _imports(current) if m != "ce_guard")
    return seen


def _is_fused(name: str) -> bool:
    return any(name == path or name.startswith(path + ".") for path in FUSED_PATHS)


def test_the_reference_reaches_no_fused_path():
    reached = _closure("ce_guard.reference")
    assert not {m for m in reached if _is_fused(m)}, sorted(reached)


def test_no_production_fused_path_reaches_the_reference_or_the_comparison():
    """(The faulty layer of ``ce_guard.testing`` reads the fault table, which names the diagnosis' causes.)"""
    for name in (m for m in MODULES if _is_fused(m) and not m.startswith("ce_guard.testing")):
        reached = _closure(name)
        assert "ce_guard.reference" not in reached, (name, sorted(reached))
        assert not reached & {"ce_guard.parity", "ce_guard.check", "ce_guard.signature"}, (name, sorted(reached))


def test_the_reference_and_the_fused_layer_share_only_neutral_plumbing():
    shared = _closure("ce_guard.reference") & _closure("ce_guard.fused")
    assert shared <= NEUTRAL, sorted(shared - NEUTRAL)


@pytest.mark.parametrize("length", [1, 4095, 4096, 4097, 8192, 100352, 151936])
def test_the_shared_blocking_rule_only_orders_a_sum(length):
    """Why ``_matmul.reduction_blocks`` may be shared: it only decides in which order a product's reduction is
    added up. Its blocks tile the reduction exactly, each index once, so a path using it sums every term, and
    no fault of a path can hide in it."""
    fake_cuda = type("Operand", (), {"is_cuda": True, "dtype": torch.float32, "shape": (3, length)})()
    out = type("Out", (), {"dtype": torch.float32})()
    covered = [i for block in _matmul.reduction_blocks(fake_cuda, out) for i in range(length)[block]]
    assert covered == list(range(length))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("add", [False, True])
def test_the_shared_16_bit_product_is_the_dtypes_own_gemm(dtype, add):
    """Why ``_matmul.matmul`` may be shared: on CPU it is the 16-bit GEMM PyTorch runs, up to the order of the fp32
    sum, and returns the operands' dtype; under autograd its gradients are rounded to that dtype as the GEMM's
    backward rounds them. It multiplies what it is handed, every product exact: what a path multiplies, and where
    it rounds or accumulates, stay the path's own."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 300, generator=gen).to(dtype).requires_grad_()
    b = (torch.randn(300, 47, generator=gen) / 8).to(dtype).requires_grad_()
    c = torch.randn(64, 47, generator=gen).to(dtype) if add else None
    ours = _matmul.matmul(a, b, add=c)
    theirs = a @ b if c is None else torch.addmm(c, a, b)

    def within_order(x, y, terms, length):
        """Each |x - y| within one ulp of ``dtype`` at |y| plus two fp32 sums' rounding over ``terms`` (|a| @ |b|)."""
        ulp = torch.finfo(dtype).eps * y.float().abs()
        return bool(((x.float() - y.float()).abs() <= ulp + 2 * length * 2.0 ** -24 * terms).all())

    a_, b_ = a.detach().float(), b.detach().float()
    terms = a_.abs() @ b_.abs() + (0 if c is None else c.float().abs())
    exact = a_.double() @ b_.double() + (0 if c is None else c.double())
    assert ours.dtype == dtype
    assert within_order(ours.detach(), theirs.detach(), terms, 301)
    assert within_order(ours.detach(), exact, terms, 301)
    grad = torch.randn(ours.shape, generator=gen).to(dtype)
    mine, native = torch.autograd.grad(ours, (a, b), grad), torch.autograd.grad(theirs, (a, b), grad)
    assert [g.dtype for g in mine] == [dtype, dtype]
    assert within_order(mine[0], native[0], grad.float().abs() @ b_.abs().T, 47)
    assert within_order(mine[1], native[1], a_.abs().T @ grad.float().abs(), 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_shared_product_of_wider_dtypes_is_their_own_gemm(dtype):
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(shape, generator=gen, dtype=dtype) for shape in ((5, 7), (7, 3), (5, 3)))
    assert torch.equal(_matmul.matmul(a, b), a @ b)
    assert torch.equal(_matmul.matmul(a, b, add=c), torch.addmm(c, a, b))


def test_the_core_imports_neither_lightning_nor_wandb():
    """Imported in a fresh interpreter: nothing the core loads at import time pulls Lightning or wandb in."""
    present = [m for m in CORE + OTHER_TRAINERS if m in MODULES]
    code = (f"import sys; import {', '.join(present)}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'wandb')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_core_module_imports_lightning_or_wandb_anywhere_in_its_file():
    """Also the imports inside functions, which a fresh import would not run."""
    for name in (m for m in MODULES if any(m == c or m.startswith(c + ".") for c in CORE + OTHER_TRAINERS)):
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            roots = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for root in roots:
                assert root.split(".")[0] not in ("lightning", "pytorch_lightning", "wandb"), (name, root)


def test_product_modules_stay_under_about_400_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 420}
    assert not long, long


def test_each_callback_module_holds_one_callback():
    from lightning.pytorch.callbacks import Callback

    modules = [name for name in MODULES if name.startswith("ce_guard.callbacks.")]
    assert modules, "the callbacks package is missing"
    for name in modules:
        module = __import__(name, fromlist=["_"])
        own = [obj for obj in vars(module).values()
               if isinstance(obj, type) and issubclass(obj, Callback) and obj.__module__ == name]
        assert len(own) <= 1, (name, own)
