"""Golden diagnoses: reports of every variant, with the verdict and the diagnosis they must keep, byte for byte.

tests/assets/diagnoses.jsonl holds one ParityReport per line (its ``to_dict()``), the group sizes it was diagnosed
with, and the ``Diagnosis.to_dict()`` that ``ce_guard/diagnose.py`` gave it at ed05c8f, before the diagnosis became
a table. The reports come from the broken paths of tests/broken_paths.py, ce_guard's fused layer with its faults
and hand-made outputs (a gradient replaced by noise, z-loss applied twice), on one rank and on two gloo ranks
(TP = 2 slices, SP shards, a DP token group), through ``compare`` and through ``check_seam`` (fitted). No path
reached ``accumulator_dtype/rounded_reciprocal``: its two cases are bf16 scale checks with a few fields perturbed
(``*_perturbed_*``), diagnosed by the same code. Per variant up to two cases, and one for each pair of rules that
both match a report of the full corpus (142 reports), so the rules' ``after`` is tested where it matters.
"""

import json
from pathlib import Path

import pytest

from ce_guard.budget import ErrorBudget
from ce_guard.diagnosis import RULES, Thresholds, diagnose, over_budget
from ce_guard.diagnosis.signals import CORE_FIELDS
from ce_guard.parity import ParityReport
from ce_guard.signature import SignatureFit
from ce_guard.testing import INJECTIONS
from tests.test_step_weight import STEP_CASES

CASES = [json.loads(line) for line in (Path(__file__).parent / "assets" / "diagnoses.jsonl").read_text().splitlines()]


def _report(record: dict) -> ParityReport:
    signature = record["signature"]
    return ParityReport(**{**record, "budget": ErrorBudget(**record["budget"]),
                           "signature": None if signature is None else SignatureFit(**signature)})


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_the_diagnosis_is_unchanged(case):
    report = _report(case["report"])
    found = diagnose(report, group_sizes=case["group_sizes"])
    assert json.dumps(found.to_dict()) == json.dumps(case["diagnosis"])
    assert (not over_budget(report)) == report.within_budget


def test_every_variant_has_a_golden_case_or_an_injected_fault():
    """The corpus holds every variant the diagnosis knew before it became a table; a seam cause added since is
    held by its row of the fault table, which tests/test_injections.py drives to its variant, and a training
    loop's cause by tests/test_step_weight.py's cases."""
    known = {variant for rule in RULES for variant in rule.variants} | {"unexplained/no_signature"}
    golden = {case["diagnosis"]["variant"] for case in CASES}
    injected = {row.variant(impl, dtype) for row in INJECTIONS for impl in ("layer", "broken_path")
                for dtype in row.dtypes}
    stepped = {variant for *_, variant in STEP_CASES}
    assert golden <= known
    assert known <= golden | injected | stepped, sorted(known - golden - injected - stepped)


class _Reading:
    """A report that notes which of its fields are read."""

    def __init__(self, report: ParityReport) -> None:
        self.report, self.read = report, set()

    def __getattr__(self, name: str):
        self.read.add(name)
        return getattr(self.report, name)


def _sizes(case: dict, report: ParityReport) -> dict[str, int]:
    """The sizes diagnose hands its rules."""
    sizes = dict(case["group_sizes"] or {})
    sizes.setdefault("TP", report.tp_size)
    sizes.setdefault("DP", report.token_group_size)
    return sizes


def test_each_rule_reads_only_its_signals_and_the_core_evidence():
    unlisted = {}
    for case in CASES:
        report = _report(case["report"])
        for rule in RULES:
            reading = _Reading(report)
            rule.match(reading, _sizes(case, report), Thresholds())
            unlisted.setdefault(rule.name, set()).update(reading.read - {*rule.signals, *CORE_FIELDS})
    assert not any(unlisted.values()), {name: fields for name, fields in unlisted.items() if fields}


def test_where_two_rules_match_the_winner_is_in_the_others_after():
    before = {}
    for rule in RULES:  # each rule's after, closed over the rules it names
        before[rule.name] = set(rule.after).union(*(before[name] for name in rule.after))
    for case in CASES:
        report = _report(case["report"])
        matched = [rule.name for rule in RULES if rule.match(report, _sizes(case, report), Thresholds()) is not None]
        for loser in matched[1:]:
            assert matched[0] in before[loser], (case["name"], matched[0], loser)
