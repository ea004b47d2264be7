"""The pinned peers' seam bugs, each case checked once on this machine's device: Transformer Engine's
``parallel_cross_entropy`` (the wheels of tests/pins/transformer-engine.txt) and flash-linear-attention's fused
linear-CE and ``l2_warp`` (fla-core 0.5.0 and 0.6.0, tests/pins/fla.txt).

    bash tests/pins/install.sh && python benchmarks/peer_pins.py      # on CUDA: the kernels themselves

The cases are tests/test_transformer_engine.py's and tests/test_fla.py's, through their own helpers (so the table
and the tests cannot drift apart), on CUDA where there is one (on a CPU, Triton's interpreter). Prints a markdown
table: package, version, case, what the guard named, and the start of its summary.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported, as tests/conftest.py does
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import test_fla as fla
import test_transformer_engine as te

BF16 = torch.bfloat16
FIXED_TE, FIXED_FLA = te.FIXED, fla.FIXED
CASES = [
    ("transformer-engine", "2.4.0", "reduce_loss=False, fp32", lambda: te.te_check("2.4.0")),
    ("transformer-engine", "2.4.0", "reduce_loss=False, bf16", lambda: te.te_check("2.4.0", dtype=BF16)),
    ("transformer-engine", "2.7.0", "per-token upstream", lambda: te.te_check("2.7.0", upstream="tokens")),
    ("transformer-engine", "2.8.0", "transposed upstream", lambda: te.te_check("2.8.0", upstream="transposed")),
    ("transformer-engine", "2.11.0", "reduce_loss=True, padding",
     lambda: te.te_check("2.11.0", reduction="mean")),
    ("transformer-engine", "2.13.0", "[S,B,V] view of batch-first logits",
     lambda: te.te_check("2.13.0", reduction="mean", pad=False, transpose_logits=True)),
    ("transformer-engine", "2.17.1", "logits handed, fp32",
     lambda: te.te_check("2.17.1", reduction="mean", pad=False)),
    ("transformer-engine", "2.17.1", "logits handed, bf16",
     lambda: te.te_check("2.17.1", dtype=BF16, reduction="mean", pad=False)),
    ("transformer-engine", "2.17.1", "per-token upstream, bf16",
     lambda: te.te_check("2.17.1", dtype=BF16, upstream="tokens")),
    *[("transformer-engine", FIXED_TE, case, check) for case, check in [
        ("reduce_loss=False, fp32", lambda: te.te_check(FIXED_TE)),
        ("reduce_loss=False, bf16", lambda: te.te_check(FIXED_TE, dtype=BF16)),
        ("transposed upstream", lambda: te.te_check(FIXED_TE, upstream="transposed")),
        ("reduce_loss=True, padding", lambda: te.te_check(FIXED_TE, reduction="mean")),
        ("[S,B,V] view of batch-first logits",
         lambda: te.te_check(FIXED_TE, reduction="mean", pad=False, transpose_logits=True)),
        ("logits handed, bf16", lambda: te.te_check(FIXED_TE, dtype=BF16, reduction="mean", pad=False)),
        ("per-token upstream, bf16", lambda: te.te_check(FIXED_TE, dtype=BF16, upstream="tokens"))]],
    *[("fla-core", version, f"fused linear-CE{' + L2-warp' if warp else ''}, {dtype_name}, padding",
       lambda version=version, warp=warp, dtype=dtype: fla.fla_check(
           fla.fused(version, dtype=dtype, l2_warp=fla.FACTOR if warp else 0.0), dtype=dtype,
           upstream=1.0 if version == "0.5.0" else 0.25))
      for version in ("0.5.0", FIXED_FLA) for warp in (False, True)
      for dtype_name, dtype in (("fp32", torch.float32), ("bf16", BF16))],
    *[("fla-core", version, f"l2_warp, upstream 0.25, {dtype_name}",
       lambda version=version, dtype=dtype: fla.fla_check(fla.unfused(version, dtype=dtype), dtype=dtype,
                                                          upstream=0.25))
      for version in ("0.5.0", FIXED_FLA) for dtype_name, dtype in (("fp32", torch.float32), ("bf16", BF16))],
]


def main() -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter)"
    print(f"device: {device}; torch {torch.__version__}\n")
    print("| package | version | case | named | the check's summary (first 220 characters) | s |")
    print("|---|---|---|---|---|---|")
    for package, version, case, check in CASES:
        started = time.perf_counter()
        try:
            named, summary = check()
        except Exception as error:  # noqa: BLE001 - a version that cannot run the case is reported; the table goes on
            named, summary = "error", f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        print(f"| {package} | {version} | {case} | `{named}` | {summary[:220]} | {time.perf_counter() - started:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
