"""``ce-guard parity / replay / report`` in process, on shipped configs and on bundles from a real fit."""

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import matplotlib.image
import pytest
import torch
from lightning_helpers import TinyLM, token_loader, trainer

from ce_guard.callbacks import CEParityCallback
from ce_guard.cli import main
from ce_guard.receipt import append_receipt

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "parity"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ce-guard: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def drifting_run(tmp_path_factory) -> Path:
    """A short fit whose output layer scales loss and gradients by 3: receipts at steps 0..3, and the drift's
    bundle at step 0 (the checks after it, of the same drift, point to it)."""
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    t, _ = trainer(root, [CEParityCallback(every_n_steps=1)], max_steps=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(TinyLM(fault="grad_scale", fault_scale=3), token_loader())
    return root


def test_parity_clean_config_is_within_budget_and_writes_a_receipt(capsys, tmp_path):
    receipt = tmp_path / "receipt.json"
    code, out, _ = run(capsys, "parity", "--config", CONFIGS / "clean.yaml", "--out", receipt)
    assert code == 0, out
    assert "ok: within_budget" in out and "label smoothing 0.1 over global V=2000" in out
    receipt = json.loads(receipt.read_text())
    assert receipt["diagnosis"]["cause"] == "within_budget" and receipt["report"]["loss_rel_err"] < 1e-6


@pytest.mark.parametrize("fault, cause, evidence", [
    ("bf16_accumulators", "accumulator_dtype", "narrower dtype"),
    ("grad_scale", "normalization_scale", "k = 4 = grad_accum size"),
    ("ignore_in_denominator", "ignore_index_leak", "padding is in the denominator"),
    ("missing_z_loss", "z_loss_boundary", "z-loss is missing"),
])
def test_parity_fault_configs_name_their_cause(capsys, fault, cause, evidence):
    code, out, _ = run(capsys, "parity", "--config", CONFIGS / f"{fault}.yaml")
    assert code == 1, out
    assert f"DRIFT: {cause}" in out and evidence in out and f"with fault {fault}" in out


def test_parity_runs_a_peer_adapter_on_the_same_inputs(capsys, tmp_path):
    config = tmp_path / "torch.yaml"
    config.write_text("shapes: {tokens: 256, hidden: 32, vocab: 500}\ncontract: {ignore_index: -1}\n"
                      "fused: {path: torch}\n")
    code, out, _ = run(capsys, "parity", "--config", config)
    assert code == 0 and "ok: within_budget" in out


def test_replay_reproduces_the_drift_of_a_real_run(capsys, drifting_run):
    bundle = drifting_run / "ce_guard" / "bundles" / "step00000000_rank0.pt"
    code, out, _ = run(capsys, "replay", bundle)
    assert code == 1, out
    assert re.search(r"recorded +normalization_scale", out)
    assert re.search(r"replayed +normalization_scale", out)
    assert "drift reproduces (same cause)" in out


def test_replay_with_another_fused_path_compares_implementations(capsys, drifting_run):
    bundle = drifting_run / "ce_guard" / "bundles" / "step00000000_rank0.pt"
    code, out, _ = run(capsys, "replay", bundle, "--fused", "ce_guard")
    assert code == 0, out  # the honest layer on the faulty run's inputs
    assert "drift reproduces" in out and "ok: within_budget" in out
    code, out, _ = run(capsys, "replay", bundle, "--fused", "torch")
    assert code == 0 and "ok: within_budget" in out


def test_report_plots_and_pages_the_receipts(capsys, drifting_run, tmp_path):
    code, out, _ = run(capsys, "report", drifting_run, "--out", tmp_path)
    assert code == 1 and "4 (steps 0..3), 4 with drift" in out  # drift in the receipts
    image = matplotlib.image.imread(tmp_path / "parity_report.png")
    assert image.shape[0] > 400 and image.shape[1] > 400 and image[..., :3].std() > 0.01
    page = (tmp_path / "parity_report.html").read_text()
    assert "data:image/png;base64," in page and page.count('<tr class="drift">') == 4
    assert "normalization_scale" in page


def test_report_on_a_clean_receipts_file_exits_zero(capsys, tmp_path):
    receipts = tmp_path / "receipts.jsonl"
    for step in range(3):
        metrics = {"ce_parity/loss_rel_err": 1e-7 * (step + 1), "ce_parity/grad_hidden_norm_ratio": 1.0,
                   "ce_parity/grad_cosine": 1.0, "ce_parity/budget_loss_rel": 2e-6}
        append_receipt(receipts, {"step": step, "drift": False, "cause": "within_budget", "summary": "ok",
                                  "metrics": metrics})
    code, out, _ = run(capsys, "report", receipts)
    assert code == 0 and "3 (steps 0..2), 0 with drift" in out
    assert (tmp_path / "parity_report.png").stat().st_size > 0


def test_bad_inputs_are_one_line_errors_with_exit_2(capsys, tmp_path, drifting_run):
    code, out, err = run(capsys, "replay", tmp_path / "missing.pt")
    assert_one_line_error(code, out, err, "missing.pt does not exist")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    code, out, err = run(capsys, "replay", corrupt)
    assert_one_line_error(code, out, err, "cannot read bundle")

    future = tmp_path / "receipts.jsonl"
    future.write_text(json.dumps({"schema_version": 99, "step": 0}) + "\n")
    code, out, err = run(capsys, "report", future)
    assert_one_line_error(code, out, err, "receipt schema version 99")

    code, out, err = run(capsys, "report", tmp_path / "nowhere")
    assert_one_line_error(code, out, err, "no receipts at")

    impossible = tmp_path / "impossible.yaml"
    impossible.write_text("shapes: {tokens: 8, hidden: 4, vocab: 50}\ncontract: {ignore_index: 3}\n")
    code, out, err = run(capsys, "parity", "--config", impossible)
    assert_one_line_error(code, out, err, "impossible contract", "`ignore_index`=3")

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("shapes: {tokens: 8, hidden: 4, vocab: 50}\n"
                       "fused: {path: ce_guard, faults: grad_scale}\n")
    code, out, err = run(capsys, "parity", "--config", unknown)
    assert_one_line_error(code, out, err, "unknown keys ['faults']")

    code, out, err = run(capsys, "parity")
    assert_one_line_error(code, out, err, "--config")


def test_console_script_module_gives_one_line_and_exit_2_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ce_guard.cli", "replay", str(tmp_path / "missing.pt")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
