"""Receipts survive what runs do to them: round trips, newer schemas, torn writes and a SIGKILL mid-loop."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ce_guard.receipt import SCHEMA_VERSION, ReceiptError, append_receipt, read_receipts

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_keeps_order_values_and_stamps_the_schema(tmp_path):
    path = tmp_path / "nested" / "receipts.jsonl"  # parents are created
    records = [
        {"step": 0, "drift": False, "cause": "within_budget", "metrics": {"ce_parity/loss_rel_err": 1.5e-7}},
        {"step": 5, "drift": True, "cause": "normalization_scale", "report": {"grad_hidden_cosine": None},
         "metrics": {"ce_parity/grad_weight_rel_err": math.nan}},
    ]
    for record in records:
        append_receipt(path, record)
    back = list(read_receipts(path))
    assert [r["schema_version"] for r in back] == [SCHEMA_VERSION] * 2
    assert [{k: v for k, v in r.items() if k != "schema_version"} for r in back][0] == records[0]
    assert back[1]["report"] == {"grad_hidden_cosine": None}
    assert math.isnan(back[1]["metrics"]["ce_parity/grad_weight_rel_err"])
    assert path.read_text().count("\n") == 2  # one line per record


def test_unknown_schema_version_is_refused_with_the_version_named(tmp_path):
    path = tmp_path / "receipts.jsonl"
    append_receipt(path, {"step": 0})
    with path.open("a") as f:
        f.write(json.dumps({"schema_version": SCHEMA_VERSION + 1, "step": 1}) + "\n")
    with pytest.raises(ReceiptError, match=f"receipts.jsonl:2: receipt schema version {SCHEMA_VERSION + 1}"):
        list(read_receipts(path))


def test_torn_last_line_is_skipped_but_a_torn_middle_line_is_an_error(tmp_path):
    path = tmp_path / "receipts.jsonl"
    for step in range(3):
        append_receipt(path, {"step": step})
    whole = path.read_text()
    path.write_text(whole + '{"schema_version": 1, "step": 3, "summ')  # died mid-write
    assert [r["step"] for r in read_receipts(path)] == [0, 1, 2]
    with pytest.raises(ReceiptError, match="receipts.jsonl:4: not a JSON record"):
        list(read_receipts(path, strict=True))

    lines = whole.splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:10] + "\n" + lines[2])  # damage that is not a crash
    with pytest.raises(ReceiptError, match="receipts.jsonl:2: not a JSON record"):
        list(read_receipts(path))


# Appends numbered records of ~20 KB (several write() pages) as fast as it can, until killed.
_WRITER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("receipt", sys.argv[1])
receipt = importlib.util.module_from_spec(spec); spec.loader.exec_module(receipt)
step = 0
while True:
    receipt.append_receipt(sys.argv[2], {"step": step, "payload": [step] * 4000})
    step += 1
"""


def test_sigkill_while_appending_leaves_every_earlier_record_intact(tmp_path):
    path = tmp_path / "receipts.jsonl"
    # Load receipt.py by path: the writer needs neither torch nor the package, so it starts in milliseconds.
    module = ROOT / "ce_guard" / "receipt.py"
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(module), str(path)])
    try:
        deadline = time.monotonic() + 20
        while (not path.exists() or path.stat().st_size < 2_000_000) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    assert writer.returncode == -signal.SIGKILL

    records = list(read_receipts(path))
    assert len(records) >= 50, "the writer never got going"
    assert [r["step"] for r in records] == list(range(len(records)))  # no gap, no duplicate, no reordering
    assert all(r["payload"] == [r["step"]] * 4000 for r in records)
    data = path.read_bytes()
    assert data.count(b"\n") == len(records)  # every complete line is a readable record
    torn = data[data.rfind(b"\n") + 1:]  # empty, or the start of the record the kill interrupted
    next_record = f'{{"schema_version": {SCHEMA_VERSION}, "step": {len(records)}, '.encode()
    assert next_record.startswith(torn) or torn.startswith(next_record)
