"""megatron-core 0.19.2 beside the installed 0.16.1, for the gloo ranks a test spawns.

0.19.2 carries Megatron-LM PR 3159's MTP rescale (``process_mtp_loss``), but pip has no wheel of it for Python
3.11; its modules are pure Python (one dataset helper aside) and import here, so the README's
test command unpacks the cp312 wheel into ``.pins/megatron-core-0.19.2`` (tests/pins/install.sh). Spawned ranks
take this process's ``sys.path``: with the pinned folder first they import 0.19.2, while this process keeps the
megatron-core it already imported.
"""

from __future__ import annotations

import contextlib
import sys

from pinned_files import PINNED_DIR, pinned_or_skip


@contextlib.contextmanager
def megatron_core_for_spawned_ranks(version: str | None):
    """Ranks spawned inside import megatron-core ``version`` (None: the installed one); skip without its pin."""
    if version is None:
        yield
        return
    folder = PINNED_DIR / f"megatron-core-{version}"
    pinned_or_skip(folder / "megatron" / "core")
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def mute_mtp_loss_logger() -> None:
    """Megatron's MTP loss logger allocates on the CUDA device (``save_loss_to_tracker`` to 0.16,
    ``save_metrics_to_tracker`` after); it only logs, so on CPU ranks it does nothing."""
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    for name in ("save_loss_to_tracker", "save_metrics_to_tracker"):
        if hasattr(MTPLossLoggingHelper, name):
            setattr(MTPLossLoggingHelper, name, staticmethod(lambda *args, **kwargs: None))
