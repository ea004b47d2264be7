"""W&B panels in a real offline fit, read back from the run's own ``.wandb`` file (no network, no W&B API)."""

import json
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import WandbLogger
from lightning_helpers import TinyLM, token_loader, trainer

from ce_guard.callbacks import CEParityCallback
from ce_guard.wandb_panels import BUNDLE_TYPE, COLUMNS, STEP_KEY, TABLE_KEY, WandbPanels

BLOCK = 32768  # the .wandb file is a LevelDB log: 32 KiB blocks of (crc32, length, type)-framed chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """Every protobuf ``Record`` of a ``.wandb`` file. wandb 0.31 ships the schema but no Python reader."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a .wandb log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's trailer too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # the writer has not flushed this chunk yet
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding up to the end of a block
            pos += -pos % BLOCK
            continue
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"corrupt chunk at byte {pos}"
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _read_finished_run(path: Path, timeout: float = 60.0) -> list:
    """The run's records once its exit record is on disk: wandb-core may still be flushing after finish()."""
    import time

    deadline = time.time() + timeout
    while True:
        records = read_wandb_records(path)
        if by_type(records, "exit") or time.time() > deadline:
            return records
        time.sleep(0.2)


def by_type(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history_rows(records) -> list[dict]:
    """History records as {"a/b": value}; nested keys (a table's fields) are joined with '.'."""
    rows = []
    for history in by_type(records, "history"):
        row = {}
        for item in history.item:
            row[".".join(item.nested_key) or item.key] = json.loads(item.value_json)
        rows.append(row)
    return rows


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    # WANDB_BASE_URL points at a closed local port: any attempt at the network would fail, not leak.
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
                       "WANDB_BASE_URL": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    real_connect = socket.socket.connect

    def local_only(sock, address):  # wandb-core is reached over a unix socket; anything else is network
        if sock.family != socket.AF_UNIX:
            raise AssertionError(f"network access attempted: {address!r}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    yield tmp_path
    import wandb

    wandb.finish()  # a failed test must not leave its run open for the next WandbLogger to reuse


def test_offline_fit_records_metrics_table_alert_and_bundle(offline_wandb):
    import wandb

    tmp_path = offline_wandb
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="ce-guard-test")
    t = pl.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=logger,
                   callbacks=[CEParityCallback(every_n_steps=2)],
                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                   default_root_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="normalization_scale"):
        t.fit(TinyLM(fault="grad_scale", fault_scale=3), token_loader())
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()

    (log_file,) = run_dir.glob("run-*.wandb")
    records = _read_finished_run(log_file)
    assert by_type(records, "exit")[0].exit_code == 0  # finished cleanly

    metrics = {m.glob_name or m.name: m for m in by_type(records, "metric")}
    assert metrics["ce_parity/*"].step_metric == STEP_KEY and metrics["ce_health/*"].step_metric == STEP_KEY
    assert metrics["ce_parity/loss_rel_err"].summary.max and metrics["ce_parity/grad_cosine"].summary.min
    ratio = metrics["ce_parity/grad_hidden_norm_ratio"].summary
    assert ratio.min and ratio.max

    rows = history_rows(records)
    parity = [r for r in rows if "ce_parity/loss_fused" in r]
    assert [r[STEP_KEY] for r in parity] == [0, 1, 2, 3, 4]  # every step once drifting (the raised rate)
    assert all(r["ce_parity/drift"] == 1.0 for r in parity)
    assert all(abs(r["ce_parity/grad_hidden_norm_ratio"] - 3.0) < 1e-3 for r in parity)

    tables = [r for r in rows if f"{TABLE_KEY}._type" in r]
    assert [r[STEP_KEY] for r in tables] == [0, 1, 2, 3, 4]
    assert tables[-1][f"{TABLE_KEY}._type"] == "incremental-table-file"
    assert tables[-1][f"{TABLE_KEY}.nrows"] == 5
    table_rows = []
    for part in sorted((run_dir / "files").glob("media/table/ce_parity/receipts_*.table.json"),
                       key=lambda p: int(p.name.split("_")[1])):
        content = json.loads(part.read_text())
        assert content["columns"] == list(COLUMNS)
        table_rows += [dict(zip(COLUMNS, row)) for row in content["data"]]
    assert [r["step"] for r in table_rows] == [0, 1, 2, 3, 4]
    assert all(r["cause"] == "normalization_scale" and r["drift"] for r in table_rows)
    assert all(r["bundle"].endswith(".pt") and r["grad_hidden_norm_ratio"] > 2.99 for r in table_rows)

    alerts = by_type(records, "alert")  # one drift going on: one alert and one bundle, not one per check
    assert len(alerts) == 1 and alerts[0].level == "WARN"
    assert alerts[0].title == "CE seam drift: normalization_scale" and "k = 3" in alerts[0].text

    bundles = [a for a in by_type(records, "artifact") if a.type == BUNDLE_TYPE]
    assert len(bundles) == 1
    assert json.loads(bundles[0].metadata)["cause"] == "normalization_scale"
    assert [e.path for e in bundles[0].manifest.contents] == ["step00000000_rank0.pt"]

    assert run_dir.name.startswith("offline-run-")
    logs = [run_dir / "logs" / name for name in ("debug-core.log", "debug-internal.log")]
    core_log = "".join(log.read_text() for log in logs)
    assert "127.0.0.1:9" not in core_log  # nor did wandb-core try the (unreachable) server


def test_without_a_wandb_logger_the_panels_do_nothing(tmp_path):
    t, _ = trainer(tmp_path, [], max_steps=1)
    panels = WandbPanels(t)
    assert not panels.active
    panels.log_check({"step": 0, "drift": True, "cause": "x", "summary": "y", "rank": 0, "bundle": "none.pt"})


def test_import_ce_guard_does_not_import_wandb():
    code = ("import sys, ce_guard.callbacks, ce_guard.cli, ce_guard.wandb_panels;"
            " assert 'wandb' not in sys.modules, 'wandb imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True)
