"""Where tests/pins/install.sh puts the peers' pinned versions, and the skip a test takes without them."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PINNED_DIR = ROOT / ".pins"


def pinned_or_skip(path: pathlib.Path) -> pathlib.Path:
    """``path`` under ``.pins``; the test is skipped, the missing path named, when it was not fetched."""
    if not path.exists():
        pytest.skip(f"no {path.relative_to(ROOT)}: run the README's test command (tests/pins/install.sh)")
    return path
