"""Liger-Kernel's fused linear-CE under per-token upstream weights (``reduction='none'``), held to the guard.

    pip install liger-kernel==0.8.1 && python benchmarks/liger_per_token_pins.py   # needs CUDA
    pip install liger-kernel==0.8.2 && python benchmarks/liger_per_token_pins.py

Each case runs ``LigerFusedLinearCrossEntropyLoss(reduction="none", accum_dtype=torch.float32)`` on [S,B] tokens,
backward under per-token upstream weights uniform in [0, 2] times the padding mask (the masked mean or RL weights a
trainer applies outside the layer), and one ``check_seam``. The cases: fp32 and bf16 inputs, the first token visible
or masked (padding, as a prompt token in SFT is). Prints one JSON object: the installed version, the device, and
per case the variant named, the summary and the evidence. Up to 0.8.1 Liger's backward multiplies every row by
``grad_output[0]`` (Liger-Kernel issue 968): the guard should name ``upstream_broadcast/first_token``; 0.8.2 folds
each token's weight into its logit gradient and should be clean. ``tests/test_gpu_liger_pinned.py`` asserts both.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json

import torch
from torch import nn

from ce_guard import SeamOutputs, SeamRecord, check_seam
from ce_guard.adapters import LigerFusedLinearCrossEntropy

IGNORE = -100


def liger_version() -> str:
    """The installed Liger-Kernel's version (the package sets no ``__version__`` up to 0.8.2)."""
    import liger_kernel

    found = getattr(liger_kernel, "__version__", None)
    if found:
        return str(found)
    for name in ("liger-kernel", "liger_kernel"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise RuntimeError("liger_kernel imports but no distribution metadata names its version")


def check_case(dtype: torch.dtype, *, first_masked: bool, seq: int = 64, batch: int = 8, hidden: int = 256,
               vocab: int = 8192, seed: int = 0, device: str = "cuda"):
    """One Liger forward + backward under per-token upstream weights and its check: (CheckResult, upstream)."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(seq, batch, hidden, generator=gen)                          # [S,B,D]
    w = torch.randn(vocab, hidden, generator=gen) * (2 / hidden ** 0.5)         # [V,D]
    targets = torch.randint(0, vocab, (seq, batch), generator=gen)              # [S,B]
    targets.view(-1)[(0 if first_masked else 1)::7] = IGNORE
    upstream = torch.rand(seq, batch, generator=gen) * 2 * (targets != IGNORE)  # [S,B] per-token weights
    h, w, targets, upstream = h.to(device, dtype), w.to(device, dtype), targets.to(device), upstream.to(device)
    layer = LigerFusedLinearCrossEntropy(hidden, vocab, weight=nn.Parameter(w.clone()), reduction="none",
                                         accum_dtype=torch.float32)  # dW in fp32: the weights are what is at stake
    x = h.clone().requires_grad_()
    loss = layer(x, targets)                                                    # [S,B] per-token losses, fp32
    loss.backward(upstream)
    fused = SeamOutputs(loss=loss.detach().float(), grad_hidden=x.grad, grad_weight=layer.weight.grad)
    record = SeamRecord(hidden=h, weight=w, targets=targets, fused=fused, upstream=upstream)
    return check_seam(record, layer.ce_contract), upstream


def run_cases(device: str = "cuda", **shape) -> dict:
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for first_masked in (False, True):
            result, upstream = check_case(dtype, first_masked=first_masked, device=device, **shape)
            d = result.diagnosis
            cases.append({"dtype": str(dtype).removeprefix("torch."), "first_token": "masked" if first_masked
                          else "visible", "first_weight": float(upstream.reshape(-1)[0]), "variant": d.variant,
                          "drift": d.drift, "summary": d.summary, "evidence": d.evidence})
    name = torch.cuda.get_device_name() if device == "cuda" else f"{device} (Triton's interpreter: TRITON_INTERPRET=1)"
    return {"liger_kernel": liger_version(), "torch": torch.__version__, "device": name, "shape": shape,
            "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--device", default="cuda", help="cpu runs Liger's kernels under TRITON_INTERPRET=1 (slow)")
    args = parser.parse_args()
    print(json.dumps(run_cases(args.device, seq=args.seq, batch=args.batch, hidden=args.hidden, vocab=args.vocab),
                     indent=1))


if __name__ == "__main__":
    main()
