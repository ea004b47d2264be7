"""The diagnosis table held to its own promises and to the fault catalogue, and its docstring examples run."""

import dataclasses
import doctest
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

from ce_guard import contract, diagnosis
from ce_guard.diagnosis import FAULT_ROW, RULES, Cause, Thresholds, causes, rules, thresholds
from ce_guard.diagnosis import gradients, offsets, outcomes, scales, signals, upstream, verdict
from ce_guard.parity import ParityReport

CATALOGUE = Path(__file__).parents[1] / "docs" / "faults.md"
OUTCOMES = {Cause.WITHIN_BUDGET, Cause.NO_VISIBLE_TOKENS, Cause.UNEXPLAINED}  # no fault row


def _headings() -> dict[int, str]:
    found = re.findall(r"^## (\d+)\. (\S+)$", CATALOGUE.read_text(), flags=re.MULTILINE)
    return {int(row): cause for row, cause in found}


def _section(cause: Cause) -> str:
    text = CATALOGUE.read_text()
    start = text.index(f"## {FAULT_ROW[cause]}. {cause.value}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def test_rule_names_are_unique_and_every_after_names_an_earlier_rule():
    names = [rule.name for rule in RULES]
    assert len(names) == len(set(names)), names
    for position, rule in enumerate(RULES):
        for earlier in rule.after:
            assert earlier in names, (rule.name, earlier)
            assert names.index(earlier) < position, f"{rule.name} must come after {earlier}"


def test_each_variant_is_named_by_one_rule():
    variants = [variant for rule in RULES for variant in rule.variants]
    assert len(variants) == len(set(variants)), variants
    assert "unexplained/no_signature" not in variants  # what diagnose says when no rule matches


def test_signals_are_report_fields():
    fields = {f.name for f in dataclasses.fields(ParityReport)}
    for rule in RULES:
        assert set(rule.signals) <= fields, (rule.name, set(rule.signals) - fields)


def test_a_rule_names_one_cause():
    with pytest.raises(ValueError, match="one cause per rule"):
        rules.Rule(name="two", variants=("z_loss_boundary/missing", "log_tp_offset/denominator_twice"),
                   signals=(), match=lambda r, sizes, t: None)


def test_every_drift_cause_has_its_heading_in_the_catalogue_and_every_heading_a_rule():
    in_table = {rule.cause for rule in RULES} - OUTCOMES
    headings = _headings()
    assert {FAULT_ROW[cause]: cause.value for cause in in_table} == headings
    assert set(FAULT_ROW) == in_table


def test_each_catalogue_heading_appears_once():
    """A section pasted twice would still resolve every anchor; the catalogue must hold each row once."""
    found = re.findall(r"^## (\d+)\. (\S+)$", CATALOGUE.read_text(), flags=re.MULTILINE)
    assert len(found) == len(set(found)) == len({row for row, _ in found}), found


def test_every_catalogue_anchor_resolves_to_a_heading():
    slugs = {re.sub(r"[^\w\- ]", "", line[3:].strip().lower()).replace(" ", "-")
             for line in CATALOGUE.read_text().splitlines() if line.startswith("## ")}
    for rule in RULES:
        if rule.cause in OUTCOMES:
            assert rule.anchor is None
            continue
        path, anchor = rule.anchor.split("#")
        assert path == "docs/faults.md" and anchor in slugs, (rule.name, rule.anchor)


def test_each_causes_section_lists_its_variants():
    for rule in RULES:
        if rule.cause not in OUTCOMES:
            for variant in rule.variants:
                assert f"`{variant}`" in _section(rule.cause), variant


def test_no_diagnosis_function_is_longer_than_sixty_lines():
    for module in (rules, outcomes, scales, offsets, gradients, signals, verdict, causes, thresholds, upstream):
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if function.__module__ == module.__name__:
                assert len(inspect.getsourcelines(function)[0]) <= 60, f"{module.__name__}.{name}"


DOCUMENTED = [importlib.import_module(f"ce_guard.diagnosis.{module.name}")
              for module in pkgutil.iter_modules(diagnosis.__path__)]


@pytest.mark.parametrize("module", [diagnosis, *DOCUMENTED, contract], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    assert doctest.testmod(module).failed == 0


def test_the_diagnosis_and_the_contract_have_examples():
    assert all(doctest.testmod(module).attempted > 0 for module in (rules, causes, thresholds, contract))


@pytest.mark.parametrize("value", [0, -1.0, float("inf"), float("nan"), True, "5"])
def test_thresholds_refuse_what_is_not_a_positive_finite_number(value):
    with pytest.raises(ValueError, match="`Thresholds.significant` must be a positive finite number"):
        Thresholds(significant=value)


def test_thresholds_keep_the_calibrated_values():
    t = Thresholds()
    assert (t.flag_spread_sigmas, t.name_spread_sigmas, t.narrow_softmax, t.narrow_rounding) == (5.0, 3.0, 2.0 ** -11,
                                                                                                 2.0 ** -7)
    assert (t.scale_cosine, t.scale_tolerance, t.offset_tolerance, t.shift_share, t.rounding_coupling,
            t.significant) == (0.999, 0.005, 0.05, 0.5, 1.6, 5.0)
