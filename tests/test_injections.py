"""Every row of the fault table, injected and named: cause and variant at the first check, on every mesh it needs.

Each row of ``ce_guard.testing.injections.INJECTIONS`` is committed by each of its implementations (ce_guard's
faulty layer, the independent broken path of ``tests/broken_paths.py``) in each dtype it is named in, and one
``check_seam`` must give the row's cause and variant. TP=1 rows run in this process; the TP=2, DP=2 and SP rows
run together in one 2-rank gloo spawn. On CUDA the faulty layer's one-rank rows run again (``gpu``). The
example's fault configs are held to the table too.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from broken_paths import FAULTS, broken_fused
from dist_helpers import run_distributed
from torch import nn

from ce_guard import CEContract, SeamOutputs, SeamRecord, check_seam
from ce_guard.diagnosis import Cause, catalogue_entry
from ce_guard.input_checksums import InputChecksums
from ce_guard.testing import INJECTIONS, LAYER_FAULTS, FaultyFusedLinearCrossEntropy, injection
from ce_guard.testing.causal_lm_faults import CAUSAL_LM_FAULTS
from ce_guard.testing.training_faults import TRAINING_FAULTS
from ce_guard.testing.injections import switches

N, D, V = 288, 32, 1024  # every 9th target ignored: 256 visible, so a mean's 1/count is exact in bf16
S, B = 36, 8  # per-token losses (reduction='none') come as [S,B]
IGNORE = -100
ROOT = Path(__file__).resolve().parent.parent


def _cases(meshes: tuple[str, ...]) -> list[tuple[str, str, str, str]]:
    """(switch, implementation, dtype, mesh) for every way a row is committed on ``meshes``."""
    return [(row.switch, impl, dtype, mesh) for row in INJECTIONS
            for impl in ("layer", "broken_path") if getattr(row, impl)
            for dtype in row.dtypes for mesh in row.meshes if mesh in meshes]


def _id(case) -> str:
    return "-".join(case)


def _inputs(dtype: torch.dtype, *, seed: int = 0, pad_every: int = 9, unigram: bool = False):
    """Hidden states (N, D), weight (V, D) and targets. With ``unigram`` the logits carry a Zipf prior, as a
    trained model's do (ids early in the vocab score higher): the vocab's two halves differ in their mean logit."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * (2 / D ** 0.5)
    if unigram:
        hidden[:, 0], weight[:, 0] = 1.0, -torch.arange(V).log1p()
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[1:3] = torch.tensor([V // 2 - 1, V // 2])  # both sides of the TP=2 slice edge
    targets[::pad_every] = IGNORE
    return hidden.to(dtype), weight.to(dtype), targets


def _placed(mesh: str, dtype: torch.dtype, options: dict, rank: int = 0):
    """This rank's hidden, weight, targets and the contract its seam declares on ``mesh``."""
    if mesh == "DP=2":  # each rank its own tokens, rank 1 padding half of them: local and global means differ
        hidden, weight, targets = _inputs(dtype, seed=1 + rank, pad_every=2 if rank else 9)
        weight = _inputs(dtype)[1]
        return hidden, weight, targets, CEContract(vocab_size=V, normalize_by="global_tokens",
                                                   token_group=dist.group.WORLD, **options)
    if mesh == "TP=1":
        return *_inputs(dtype), CEContract(vocab_size=V, **options)
    hidden, weight, targets = _inputs(dtype, unigram=True)
    rows = slice(rank * V // 2, (rank + 1) * V // 2)
    layout = "[S,B,V/TP]"
    if mesh == "SP":  # each rank brings its half of the sequence
        tokens = slice(rank * N // 2, (rank + 1) * N // 2)
        hidden, targets, layout = hidden[tokens], targets[tokens], "[S/SP,B,V/TP]"
    return hidden, weight[rows], targets, CEContract(vocab_size=V, layout=layout, vocab_start=rows.start,
                                                     vocab_end=rows.stop, tp_group=dist.group.WORLD, **options)


def _per_token_upstream(targets: torch.Tensor) -> torch.Tensor:
    """Per-token upstream weights, as a masked mean or RL weights taken outside the layer give them: uniform in
    [0, 2] times the padding mask; the same on every rank."""
    gen = torch.Generator().manual_seed(7)
    return torch.rand(targets.shape, generator=gen).to(targets.device) * 2 * (targets != IGNORE)


def _layer_outputs(switch: str, hidden, weight, targets, contract, fault_scale: float, upstream) -> SeamOutputs:
    layer = FaultyFusedLinearCrossEntropy(D, contract, weight=nn.Parameter(weight.clone()), fault=switch,
                                          fault_scale=fault_scale)
    h = hidden.clone().requires_grad_()
    loss = layer(h, targets)
    loss.backward(upstream if torch.is_tensor(upstream) else torch.tensor(float(upstream)))
    return SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=layer.weight.grad)


def _first_check(case, rank: int = 0, device: str = "cpu") -> tuple[str, str]:
    """Commit the case's fault once and check it: the variant named and its sentence."""
    switch, impl, dtype, mesh = case
    row = injection(switch)
    hidden, weight, targets, contract = _placed(mesh, getattr(torch, dtype), dict(row.contract), rank)
    hidden, weight, targets = hidden.to(device), weight.to(device), targets.to(device)
    upstream = row.upstream
    if contract.reduction == "none":  # per-token losses of [S,B] tokens, under per-token upstream weights
        hidden, targets = hidden.reshape(S, B, -1), targets.reshape(S, B)
        upstream = _per_token_upstream(targets)
    scale = row.fault_scale or 2
    checksums, handed = InputChecksums.of(hidden=hidden, weight=weight), {}
    if impl == "layer":
        fused = _layer_outputs(switch, hidden, weight, targets, contract, scale, upstream)
    else:
        fused = broken_fused(hidden, weight, targets, contract, switch, scale=scale, chunks=row.chunks or 8,
                             grad_output=upstream, handed=handed)
    checksums = checksums.measured_after(hidden=hidden, weight=weight).merged(handed.get("logits"))
    record = SeamRecord(hidden=hidden, weight=weight, targets=targets, fused=fused, upstream=upstream,
                        input_checksums=checksums)
    diagnosis = check_seam(record, contract).diagnosis
    return diagnosis.variant, diagnosis.summary


def _expected(case) -> tuple[Cause, str]:
    switch, impl, dtype, _ = case
    row = injection(switch)
    return row.cause, row.variant(impl, dtype)


@pytest.mark.parametrize("case", _cases(("TP=1",)), ids=_id)
def test_one_rank_injection_is_named_at_the_first_check(case):
    cause, variant = _expected(case)
    named, summary = _first_check(case)
    assert (named.split("/")[0], named) == (cause.value, variant), summary


def _two_rank_checks(rank: int, world: int) -> dict[str, tuple[str, str]]:
    return {_id(case): _first_check(case, rank) for case in _cases(("TP=2", "DP=2", "SP"))}


@pytest.fixture(scope="module")
def two_rank_checks():
    return run_distributed(_two_rank_checks, 2)


@pytest.mark.distributed
@pytest.mark.parametrize("case", _cases(("TP=2", "DP=2", "SP")), ids=_id)
def test_two_rank_injection_is_named_at_the_first_check_on_every_rank(two_rank_checks, case):
    cause, variant = _expected(case)
    for rank, checks in enumerate(two_rank_checks):
        named, summary = checks[_id(case)]
        assert (named.split("/")[0], named) == (cause.value, variant), (rank, summary)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", [c for c in _cases(("TP=1",)) if c[1] == "layer"], ids=_id)
def test_faulty_layer_on_cuda_is_named_at_the_first_check(case):
    cause, variant = _expected(case)
    named, summary = _first_check(case, device="cuda")
    assert (named.split("/")[0], named) == (cause.value, variant), summary


# --- the table itself ------------------------------------------------------------------------------------------


def test_the_table_has_one_row_per_switch_and_each_implementation_knows_its_rows():
    names = [row.switch for row in INJECTIONS]
    assert len(names) == len(set(names)), names
    assert set(LAYER_FAULTS) == set(switches(layer=True)) and FAULTS == switches(broken_path=True)
    assert set(CAUSAL_LM_FAULTS) == {row.switch for row in INJECTIONS if row.causal_lm}
    assert set(TRAINING_FAULTS) == {row.switch for row in INJECTIONS if row.training_step}
    assert set(names) == set(LAYER_FAULTS) | set(FAULTS) | set(CAUSAL_LM_FAULTS) | set(TRAINING_FAULTS)


def test_every_row_links_its_catalogue_heading():
    headings = set(re.findall(r"^## (\d+)\. (\w+)$", (ROOT / "docs" / "faults.md").read_text(), flags=re.MULTILINE))
    for row in INJECTIONS:
        number, cause = row.anchor.removeprefix("docs/faults.md#").split("-", 1)
        assert (number, cause) in headings and cause == row.cause.value, row.anchor


def test_a_row_that_breaks_its_own_rules_is_refused():
    with pytest.raises(ValueError, match="must start with the cause"):
        type(INJECTIONS[0])(switch="x", what="x", cause=Cause.NON_FINITE, variants={"float32": "within_budget/clean"},
                            meshes=("TP=1",), broken_path=True)
    with pytest.raises(ValueError, match="`meshes`"):
        type(INJECTIONS[0])(switch="x", what="x", cause=Cause.NON_FINITE, variants={"float32": "non_finite/values"},
                            meshes=("TP=3",), broken_path=True)
    with pytest.raises(ValueError, match="unknown fault switch 'x'"):
        injection("x")


def _overlay_switch(config: dict) -> str | None:
    """The fault an example or ``ce-guard parity`` overlay switches on: model, fused path, or injecting callback."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    injected = [c["init_args"]["fault"] for c in callbacks
                if c["class_path"].endswith(("InjectSeamFault", "InjectTrainingFault"))]
    found = [s for s in ((config.get("model") or {}).get("fault"), (config.get("fused") or {}).get("fault"))
             if s] + injected
    assert len(found) <= 1, found
    return found[0] if found else None


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_fault_configs_switch_a_table_row_and_document_its_cause(path):
    text = path.read_text()
    switch = _overlay_switch(yaml.safe_load(text))
    documented = re.findall(r"docs/faults\.md#\d+-\w+", text)
    if switch is None:  # a clean config, or a fault of a peer's own code: what it names is a catalogue entry
        assert all(anchor in {catalogue_entry(c) for c in Cause} for anchor in documented), documented
        return
    row = injection(switch)
    assert row.layer or row.training_step, f"{switch} is not a switch of the faulty layer or the training loop"
    assert documented == [row.anchor], (documented, row.anchor)
    assert set(row.contract) <= set(_overlay_contract(yaml.safe_load(text))), (switch, row.contract)


def _overlay_contract(config: dict) -> dict:
    """The contract options an overlay sets: the example's model section or a parity config's contract."""
    return {**(config.get("model") or {}), **(config.get("contract") or {})}


def test_the_production_layer_names_no_fault_and_its_core_never_imports_the_testing_package():
    for module in ("fused", "fused_chunk", "fused_kernel"):
        source = (ROOT / "ce_guard" / f"{module}.py").read_text()
        assert not [row.switch for row in INJECTIONS if row.switch in source], module
    core = "import ce_guard, ce_guard.fused, ce_guard.callbacks, sys; print('ce_guard.testing' in sys.modules)"
    assert subprocess.check_output([sys.executable, "-c", core], cwd=ROOT, text=True).strip() == "False"
