"""Demo model, parallel plan and data for ce_guard examples: a user of the library, never a dependency."""

import importlib.util

_missing = [name for name in ("einops", "tiktoken") if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(f"ce_guard.demos needs {' and '.join(_missing)}, which the example's extra installs:"
                      " pip install 'ce_guard[example]'.")
