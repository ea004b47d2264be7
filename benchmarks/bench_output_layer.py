"""Output layer forward + backward: time, peak extra memory and gradient error of ce_guard's fused layer and its peers.

Each path gets the same bf16 hidden states, weight and targets (every 17th token ignored), computes a
``mean`` cross-entropy and both gradients. Errors are relative to an fp32 reference computed by this
script's own chunked float32 code (not ``ce_guard.reference``, so the benchmark is a third opinion).
``ce_guard.reference`` itself is timed as one more path: it returns its gradients directly, in fp32.

    python benchmarks/bench_output_layer.py                  # GPU, the two LLM-head shapes
    python benchmarks/bench_output_layer.py --quick          # tiny shapes, runs on CPU in seconds
    python benchmarks/bench_output_layer.py --sweep-chunks 2048,8192   # plus ce_guard fused at these chunks
    python benchmarks/bench_output_layer.py --paths reference --sweep-reference 8192x67108864  # reference blocks
    python benchmarks/bench_output_layer.py --paths Liger --profile trace.json  # + a profile of the fused layer

Writes a JSON record (``--out``) and prints a markdown table (also to ``--out-md``), with each path's
time over the bf16 matmul floor (6 N D V flops at a rate measured in the same run). Peers that are not
importable are listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ce_guard.adapters import CutCrossEntropy, LigerFusedLinearCrossEntropy, TorchLinearCrossEntropy
from ce_guard.contract import CEContract
from ce_guard.fused import FusedLinearCrossEntropy
from ce_guard.reference import reference_linear_cross_entropy

IGNORE = -100
FULL_SHAPES = [(16384, 4096, 151936), (16384, 2048, 32768)]  # (N = B*S tokens, D, V)
QUICK_SHAPES = [(256, 64, 1000), (203, 48, 517)]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden, targets) -> loss
GradFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # -> loss, dh, dW
LOW_MEMORY_CHUNK = 512  # tokens per chunk of the fused layer's documented low-memory setting


@dataclass
class Row:
    path: str
    status: str = "ok"  # "ok", or why the path did not run
    ms: float | None = None
    over_floor: float | None = None  # ms over the bf16 matmul floor of this shape
    extra_gb: float | None = None  # peak beyond the inputs (gradient outputs included)
    extra_gb_beyond_grads: float | None = None  # the same less the dh and dW outputs themselves
    loss_abs_err: float | None = None
    dh_rel_err: float | None = None
    dw_rel_err: float | None = None


def make_inputs(n: int, d: int, v: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(device, dtype)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::17] = IGNORE
    return hidden, weight, targets.to(device)


def fp32_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, token_chunk: int = 1024):
    """Loss, dL/dh, dL/dW of the token mean in float32 (no TF32), one chunk of logits at a time."""
    h, w = hidden.float(), weight.float()
    valid = targets != IGNORE
    count = valid.sum().clamp_min(1).float()
    loss = torch.zeros((), device=h.device)
    dh = torch.empty_like(h)
    dw = torch.zeros_like(w)
    for start in range(0, h.shape[0], token_chunk):
        rows = slice(start, start + token_chunk)
        logits = h[rows] @ w.T  # (n, V)
        lse = torch.logsumexp(logits, dim=1)  # (n,)
        y = targets[rows]
        keep = valid[rows]
        picked = logits.gather(1, torch.where(keep, y, 0)[:, None]).squeeze(1)
        loss += torch.where(keep, lse - picked, 0).sum() / count
        grad = torch.softmax(logits, dim=1)  # (n, V) becomes dLoss/dlogits below
        grad[torch.arange(grad.shape[0], device=grad.device)[keep], y[keep]] -= 1
        grad *= (keep.float() / count)[:, None]
        dh[rows] = grad @ w
        dw += grad.T @ h[rows]
    return loss, dh, dw


def materialised(weight: nn.Parameter) -> LossFn:
    def loss_fn(hidden, targets):
        logits = F.linear(hidden, weight)  # (N, V) in bf16
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)
    return loss_fn


class SkipPath(Exception):
    """This path cannot run here (peer not installed, or not worth it on this device)."""


def reference_path(**blocks) -> Callable[[nn.Parameter], GradFn]:
    """ce_guard's trusted path: chunked, fp32 logits, gradients returned directly (no autograd), in fp32.

    ``blocks``: its ``token_chunk`` and ``chunk_elements``, where not the defaults.
    """
    def build(weight: nn.Parameter) -> GradFn:
        contract = CEContract(vocab_size=weight.shape[0], ignore_index=IGNORE)

        def grads(hidden, targets):
            result = reference_linear_cross_entropy(hidden, weight.detach(), targets, contract, **blocks)
            return result.loss, result.grad_hidden, result.grad_weight
        return grads
    return build


def fused(d: int, v: int, **options) -> Callable[[nn.Parameter], LossFn]:
    accum_dtype = options.pop("accum_dtype", torch.float32)
    contract = CEContract(vocab_size=v, accum_dtype=accum_dtype)
    return lambda weight: FusedLinearCrossEntropy(d, contract, weight=weight, **options)


def build_paths(d: int, v: int, device: torch.device, sweep_chunks: tuple[int, ...] = (),
                reference_blocks: tuple[tuple[int, int], ...] = ()) -> dict[str, Callable[[nn.Parameter], LossFn | GradFn]]:
    """Constructors taking the weight, so a missing peer fails (and is skipped) when built, not at import.

    A constructor's result is a ``LossFn`` (autograd computes the gradients), or a ``GradFn`` for the
    reference (its names start with :data:`DIRECT_GRADS`).
    """
    def compiled(weight):
        if device.type != "cuda":
            raise SkipPath("not on CPU (compile time dominates tiny shapes)")
        return torch.compile(materialised(weight))

    bf16 = torch.bfloat16
    paths = {
        "ce_guard fused (fp32 dW accumulator)": fused(d, v),
        "ce_guard fused (bf16 dW accumulator contract)": fused(d, v, accum_dtype=bf16),
        f"ce_guard fused (bf16 dW contract, token_chunk={LOW_MEMORY_CHUNK})":
            fused(d, v, accum_dtype=bf16, token_chunk=LOW_MEMORY_CHUNK),
    }
    for chunk in sweep_chunks:
        paths[f"ce_guard fused (fp32 dW, token_chunk={chunk})"] = fused(d, v, token_chunk=chunk)
        paths[f"ce_guard fused (bf16 dW contract, token_chunk={chunk})"] = fused(d, v, accum_dtype=bf16,
                                                                                 token_chunk=chunk)
    paths[f"{DIRECT_GRADS} (default blocks, backward_dtype)"] = reference_path()
    for token_chunk, chunk_elements in reference_blocks:
        paths[f"{DIRECT_GRADS} (token_chunk={token_chunk}, chunk_elements={chunk_elements})"] = reference_path(
            token_chunk=token_chunk, chunk_elements=chunk_elements)
    return paths | {
        "materialised bf16 matmul + fp32 CE": materialised,
        "torch.compile of materialised": compiled,
        "Liger FLCE (default)": lambda weight: LigerFusedLinearCrossEntropy(d, v, weight=weight),
        "Cut CE (default)": lambda weight: CutCrossEntropy(d, v, weight=weight),
        "F.linear_cross_entropy (chunked)": lambda weight: TorchLinearCrossEntropy(d, v, weight=weight),
    }


DIRECT_GRADS = "ce_guard reference, trusted path"


def step(loss_fn: LossFn, weight: nn.Parameter, hidden: torch.Tensor, targets: torch.Tensor):
    h = hidden.detach().requires_grad_()
    loss = loss_fn(h, targets)
    dh, dw = torch.autograd.grad(loss, (h, weight))
    return loss.detach(), dh, dw


def matmul_tflops(device: torch.device, size: int = 8192, repeats: int = 20) -> float | None:
    """bf16 matmul rate on random data, measured here (the floor's denominator)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    ms = time_ms(lambda: a @ b, device, warmup=5, repeats=repeats)
    return 2 * size ** 3 / (ms * 1e-3) / 1e12


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_extra_gb(fn: Callable[[], tuple], device: torch.device) -> tuple[float | None, float | None]:
    """Peak allocated beyond what was live before the step (inputs, reference results), with and without grads."""
    if device.type != "cuda":
        return None, None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _, dh, dw = fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = dh.numel() * dh.element_size() + dw.numel() * dw.element_size()
    return extra / 1e9, (extra - grads) / 1e9


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).norm() / expected.norm()).item()


def bench_shape(n: int, d: int, v: int, device: torch.device, warmup: int, repeats: int,
                sweep_chunks: tuple[int, ...] = (), floor_ms: float | None = None,
                only: tuple[str, ...] = (), reference_blocks: tuple[tuple[int, int], ...] = ()) -> list[Row]:
    hidden, weight, targets = make_inputs(n, d, v, device, torch.bfloat16)
    ref_loss, ref_dh, ref_dw = fp32_reference(hidden, weight, targets)
    rows = []
    for name, build in build_paths(d, v, device, sweep_chunks, reference_blocks).items():
        if only and not any(word.lower() in name.lower() for word in only):
            continue
        row = Row(name)
        w = nn.Parameter(weight.clone())
        try:
            loss_fn = build(w)
        except ImportError as error:
            extra = re.search(r"pip install '[^']+'", str(error))
            rows.append(Row(name, status=f"skipped: not installed ({extra.group(0) if extra else error})"))
            continue
        except SkipPath as reason:
            rows.append(Row(name, status=f"skipped: {reason}"))
            continue
        if name.startswith(DIRECT_GRADS):
            run = functools.partial(loss_fn, hidden, targets)
        else:
            run = functools.partial(step, loss_fn, w, hidden, targets)
        try:
            loss, dh, dw = run()
            row.loss_abs_err = abs(loss.float().item() - ref_loss.item())
            row.dh_rel_err, row.dw_rel_err = rel_err(dh, ref_dh), rel_err(dw, ref_dw)
            del loss, dh, dw
            row.ms = time_ms(run, device, warmup, repeats)
            row.over_floor = None if floor_ms is None else row.ms / floor_ms
            row.extra_gb, row.extra_gb_beyond_grads = peak_extra_gb(run, device)
        except torch.OutOfMemoryError:
            row.status = "out of memory"
        except Exception as error:  # noqa: BLE001 - one broken peer must not hide the others' numbers
            row.status = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
        del loss_fn, run, w
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


def markdown(results: list[dict]) -> str:
    lines = [("| path | N | D | V | ms | x floor | extra GB | extra GB beyond grads | loss abs err | dh rel err"
              " | dW rel err | status |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    for shape in results:
        for row in shape["rows"]:
            lines.append(f"| {row['path']} | {shape['N']} | {shape['D']} | {shape['V']} | {fmt(row['ms'], '.1f')} |"
                         f" {fmt(row['over_floor'], '.2f')} |"
                         f" {fmt(row['extra_gb'], '.3f')} | {fmt(row['extra_gb_beyond_grads'], '.3f')} |"
                         f" {fmt(row['loss_abs_err'], '.1e')} |"
                         f" {fmt(row['dh_rel_err'], '.1e')} | {fmt(row['dw_rel_err'], '.1e')} | {row['status']} |")
        if shape.get("floor_ms") is not None:
            lines.append(f"| bf16 matmul floor (6 N D V at {shape['tflops']:.0f} TFLOP/s measured) | {shape['N']} |"
                         f" {shape['D']} | {shape['V']} | {shape['floor_ms']:.1f} | 1.00 | | | | | | |")
    return "\n".join(lines)


def profile_fused(n: int, d: int, v: int, device: torch.device, trace_path: str) -> None:
    """Two steps of the default fused layer under torch.profiler: its kernels by time, and a Chrome trace."""
    from torch.profiler import ProfilerActivity, profile

    hidden, weight, targets = make_inputs(n, d, v, device, torch.bfloat16)
    weight = nn.Parameter(weight)
    layer = fused(d, v)(weight)
    for _ in range(3):
        step(layer, weight, hidden, targets)
    on_cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * on_cuda) as prof:
        for _ in range(2):
            step(layer, weight, hidden, targets)
        if on_cuda:
            torch.cuda.synchronize()
    print(f"\n# ce_guard fused (default), N={n} D={d} V={v}: two steps under torch.profiler\n")
    print(prof.key_averages().table(sort_by="cuda_time_total" if on_cuda else "cpu_time_total", row_limit=15,
                                    max_name_column_width=70))
    prof.export_chrome_trace(trace_path)
    print(f"wrote {trace_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes; runs on CPU in seconds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep-chunks", default="", help="comma-separated token chunks for extra fused rows")
    parser.add_argument("--sweep-reference", default="",
                        help="comma-separated token_chunk x chunk_elements, e.g. 8192x67108864, for extra reference rows")
    parser.add_argument("--paths", default="", help="comma-separated words; run only paths whose name has one")
    parser.add_argument("--shapes", default="", help="e.g. 16384x4096x151936 (default: both LLM-head shapes)")
    parser.add_argument("--out", default="bench_output_layer.json")
    parser.add_argument("--out-md", default=None, help="also write the markdown table here")
    parser.add_argument("--profile", default=None, metavar="TRACE",
                        help="also profile two steps of the default fused layer at the first shape; Chrome trace here")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32, not TF32
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    only = tuple(word for word in args.paths.split(",") if word)
    sweep_chunks = tuple(int(c) for c in args.sweep_chunks.split(",") if c)
    reference_blocks = tuple(tuple(int(x) for x in b.split("x")) for b in args.sweep_reference.split(",") if b)
    tflops = matmul_tflops(device)
    results = []
    for n, d, v in shapes:
        floor_ms = None if tflops is None else 6 * n * d * v / (tflops * 1e12) * 1e3
        rows = bench_shape(n, d, v, device, args.warmup, args.repeats, sweep_chunks, floor_ms, only, reference_blocks)
        results.append({"N": n, "D": d, "V": v, "tflops": tflops, "floor_ms": floor_ms,
                        "rows": [asdict(r) for r in rows]})
        print(markdown(results[-1:]), flush=True)  # progress: a long run still leaves its finished shapes
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": "bfloat16", "ignore_every": 17, "reduction": "mean",
              "warmup": args.warmup, "repeats": args.repeats, "matmul_tflops": tflops, "results": results}
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    table = (f"# output layer, {record['device']}, torch {record['torch']}, bf16, median of {args.repeats}\n\n"
             + markdown(results))
    if args.out_md:
        with open(args.out_md, "w") as f:
            f.write(table + "\n")
    print("\n" + table)
    print(f"\nwrote {args.out}")
    if args.profile:
        profile_fused(*shapes[0], device, args.profile)


if __name__ == "__main__":
    main()
