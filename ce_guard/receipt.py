"""Parity receipts: one JSON line per check, appended so that a crash can only lose the line being written.

Each record is serialised first and written with a single ``write`` on a file opened in append mode,
then flushed and fsynced: earlier lines are never rewritten, and a torn last line is skipped (and
reported) on reading.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


class ReceiptError(ValueError):
    """A receipt file or record that this version of ce_guard cannot read."""


def append_receipt(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` (stamped with the schema version) as one line; durable once this returns."""
    line = json.dumps({"schema_version": SCHEMA_VERSION, **record}, default=_jsonable, allow_nan=True) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_receipts(path: str | os.PathLike, *, strict: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the records of a receipt file in order.

    A torn final line (the process died mid-write) is skipped unless ``strict``; a record with an unknown
    schema version raises :class:`ReceiptError` naming the version.
    """
    lines = Path(path).read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if strict or number != len(lines):
                raise ReceiptError(f"{path}:{number}: not a JSON record ({err.msg}).") from err
            return  # the torn last line of an interrupted write
        version = record.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ReceiptError(f"{path}:{number}: receipt schema version {version!r}; this ce_guard reads version"
                               f" {SCHEMA_VERSION}. Upgrade ce_guard to read it.")
        yield record


def drop_receipts_after(path: str | os.PathLike, step: int) -> int:
    """Keep only records with ``record["step"] <= step``; return how many were dropped.

    On resume from a checkpoint the steps after it run again, so their receipts from the lost run would
    be duplicates. The kept records are written to a temporary file that atomically replaces the original:
    a crash here leaves either the old file or the new one, never a mix.
    """
    path = Path(path)
    if not path.exists():
        return 0
    text = path.read_text()
    records = list(read_receipts(path))
    kept = [r for r in records if r.get("step", -1) <= step]
    if len(kept) == len(records) and (not text or text.endswith("\n")):
        return 0  # nothing to drop and no torn tail to clear
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r, default=_jsonable, allow_nan=True) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(records) - len(kept)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "value"):  # enums
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)
