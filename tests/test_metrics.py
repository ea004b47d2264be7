"""The metric registry is the one source of every logged name: the callbacks, W&B panels and report read it."""

import ast
import re
from pathlib import Path

import pytest
import torch

from ce_guard import report, wandb_panels
from ce_guard.check import SeamRecord, check_seam
from ce_guard.contract import CEContract
from ce_guard.metrics import BY_NAME, METRICS, REPORT_PANELS, SECTIONS, check_metrics, metric_key
from ce_guard.diagnosis import margins
from ce_guard.parity import SeamOutputs

PACKAGE = Path(__file__).resolve().parents[1] / "ce_guard"
KEYS = {m.key for m in METRICS}


def test_every_metric_is_registered_once_with_a_meaning_and_a_way_to_combine():
    assert len(BY_NAME) == len(METRICS)
    for m in METRICS:
        assert m.section in SECTIONS and m.meaning, m
        assert (m.reduce is None) == (m.read is None), m  # a check's reading says how ranks combine it
    assert {m.panel for m in METRICS if m.panel} == set(REPORT_PANELS)
    assert all(p.budget is None or p.budget in BY_NAME for p in REPORT_PANELS)
    with pytest.raises(KeyError, match="'loss_rel' is not registered"):
        metric_key("loss_rel")


def test_wandb_panels_and_report_name_only_registered_metrics():
    assert set(wandb_panels.SUMMARIES) <= KEYS and wandb_panels.SUMMARIES["ce_parity/grad_cosine"] == "min,last"
    table = [c for c in wandb_panels.COLUMNS if c not in ("step", "drift", "cause", "summary", "rank", "bundle")]
    assert table == ["loss_fused", "loss_ref", "loss_rel_err", "grad_hidden_norm_ratio", "grad_cosine",
                     "grad_weight_norm_ratio", "step_weight_factor", "budget_loss_rel"]
    assert [[m.name for m in drawn] for _, drawn in report.PANELS] == [
        ["margin_loss", "margin_grad_hidden", "margin_grad_weight", "margin_softmax"], ["loss_rel_err"],
        ["grad_hidden_norm_ratio"], ["grad_cosine"], ["grad_weight_norm_ratio"], ["step_weight_factor"]]
    assert report.TABLE_COLUMNS == ("step", "drift", "cause", "loss_rel_err", "grad_hidden_norm_ratio",
                                    "grad_cosine", "grad_weight_norm_ratio", "step_weight_factor", "summary")


@pytest.mark.parametrize("module", ["wandb_panels.py", "report.py", "callbacks/parity.py", "callbacks/health.py"])
def test_no_module_spells_a_metric_key_of_its_own(module):
    """Any ``ce_parity/...`` or ``ce_health/...`` string left in a reader is a registered key (or the W&B table)."""
    tree = ast.parse((PACKAGE / module).read_text())
    spelled = {match for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
               for match in re.findall(r"\bce_(?:parity|health)/\w+", node.value)}
    assert spelled <= KEYS | {wandb_panels.TABLE_KEY}, spelled - KEYS


def test_check_metrics_reads_the_report_in_the_order_agree_reduces():
    contract = CEContract(vocab_size=50)
    hidden, weight = torch.randn(16, 8), torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (16,))
    h = hidden.clone().requires_grad_()
    loss = 2 * torch.nn.functional.cross_entropy(h @ weight.T, targets)  # a scale: over budget, fitted
    gh, gw = torch.autograd.grad(loss, [h, weight])
    record = SeamRecord(hidden=hidden, weight=weight.detach(), targets=targets,
                        fused=SeamOutputs(loss=loss.detach(), grad_hidden=gh, grad_weight=gw), upstream=1.0)
    r = check_seam(record, contract).report
    means, maxima = check_metrics(r)
    assert list(means) == ["loss_fused", "loss_ref", "loss_rel_err", "grad_hidden_norm_ratio", "grad_cosine",
                           "grad_hidden_rel_err", "grad_weight_norm_ratio", "grad_weight_rel_err",
                           "step_weight_factor", "budget_loss_rel", "budget_grad_hidden_rel"]
    assert list(maxima) == ["max_per_token_abs_diff", "max_grad_hidden_abs_diff", "margin_loss", "margin_grad_hidden",
                            "margin_grad_weight", "margin_softmax"]
    assert (means["loss_rel_err"], means["grad_cosine"], means["budget_loss_rel"]) == (
        r.loss_rel_err, r.grad_hidden_cosine, r.budget.loss_rel)
    assert {q: maxima[f"margin_{q}"] for q in ("loss", "grad_hidden", "grad_weight", "softmax")} == margins(r)
    assert maxima["margin_softmax"] is not None and maxima["max_per_token_abs_diff"] is None


def test_the_trainer_free_modules_import_neither_lightning_nor_wandb():
    import subprocess
    import sys

    code = ("import sys, ce_guard.recording, ce_guard.bundle, ce_guard.spike, ce_guard.metrics;"
            " leaked = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'wandb')];"
            " assert not leaked, leaked")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)
