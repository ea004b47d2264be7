"""Golden diagnoses: reports of every variant, with the verdict and the diagnosis they must keep, byte for byte.

tests/assets/diagnoses.jsonl holds one ParityReport per line (its ``to_dict()``), the group sizes it was diagnosed
with, and the ``Diagnosis.to_dict()`` that ``ce_guard/diagnose.py`` gave it at ed05c8f, before the diagnosis became
a table. The reports come from the broken paths of tests/broken_paths.py, ce_guard's fused layer with its faults
and hand-made outputs (a gradient replaced by noise, z-loss applied twice), on one rank and on two gloo ranks
(TP = 2 slices, SP shards, a DP token group), through ``compare`` and through ``check_seam`` (fitted).
"""

import json
from pathlib import Path

import pytest

from ce_guard.budget import ErrorBudget
from ce_guard.diagnosis import RULES, diagnose, over_budget
from ce_guard.parity import ParityReport
from ce_guard.signature import SignatureFit

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


def test_the_corpus_holds_every_variant():
    named = {case["diagnosis"]["variant"] for case in CASES}
    assert named == {variant for rule in RULES for variant in rule.variants} | {"unexplained/no_signature"}
