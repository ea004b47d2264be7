"""Calibrate the guard's verdicts: false alarms on correct fused paths, and the smallest fault it flags.

    python benchmarks/calibrate_guard.py false-alarms --checks 2000 --out runs/calibration/false_alarms.json
    python benchmarks/calibrate_guard.py power --out runs/calibration/power.json
    # the same modes on 2 ranks (gloo on CPU, nccl on CUDA): TP = 2 (and DP = 2 for local normalisation)
    torchrun --standalone --nproc_per_node=2 benchmarks/calibrate_guard.py false-alarms --out runs/calibration/tp2.json

``false-alarms`` runs ``check_seam`` on correct fused paths over a grid of dtype, shape (N tokens, D, V) and
token chunk, with fresh random inputs per check, and counts drift verdicts (the target is zero). Paths:
ce_guard's fused layer (vocab-parallel, layout ``[S,B,V/TP]``, when launched on 2 ranks), Liger's FLCE with
fp32 accumulation (CUDA, when ``liger_kernel`` imports), ``F.linear_cross_entropy`` (torch >= 2.13) and, on
request (``--paths``, CUDA), flash-linear-attention's fused linear-CE (with and without its L2-warp) and
Transformer Engine's ``parallel_cross_entropy``. Per
grid key it keeps the budget itself and how close each error came to it (``err / budget``): that is the
table of how the budget scales with dtype, V, N and chunk count.

``power`` injects each fault into ce_guard's fused layer at growing magnitude, ``--repeats`` checks per
magnitude on fresh inputs, and counts the checks that flag it and the causes named. Each check sees a new
batch, so "flagged in k of R" is the per-check detection rate and the first flagging repeat is the check
at which a run with independent batches would first be told. On one process: the faults one rank can
commit (gradient scale, bf16 accumulators, z-loss, padding); on 2 ranks: the partition faults at TP = 2
and local normalisation with unequal padding at DP = 2.

Both stop cleanly at ``--max-seconds`` (before a check that would not fit, judged by the last one of its
kind) and rewrite their JSON and ``--out-md`` table as they go, so a killed run still leaves results.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ce_guard import CEContract, CheckResult, SeamOutputs, SeamRecord, check_seam, diagnosis
from ce_guard.fused import FusedLinearCrossEntropy
from ce_guard.testing import FaultyFusedLinearCrossEntropy, injection

IGNORE = -100


# --------------------------------------------------------------------------------------------- ranks
@dataclass(frozen=True)
class World:
    """This process's rank among those torchrun started (one when it did not), and its device."""

    rank: int
    size: int
    device: torch.device

    @property
    def group(self):
        return dist.group.WORLD if self.size > 1 else None

    def vocab_slice(self, vocab: int) -> tuple[int, int]:
        """This rank's ``[start, end)`` of the vocabulary, by torch.chunk's rule (as DTensor's Shard(-1))."""
        size = math.ceil(vocab / self.size)
        return min(self.rank * size, vocab), min((self.rank + 1) * size, vocab)

    def gather(self, item) -> list:
        if self.size == 1:
            return [item]
        out = [None] * self.size
        dist.all_gather_object(out, item)
        return out

    def any(self, flag: bool) -> bool:
        """One decision for every rank: a rank that stops alone would leave the others in a collective."""
        return any(self.gather(flag))


def init_world(device: str) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, torch.device(device))
    if device == "cuda":
        local = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=local)
        return World(dist.get_rank(), size, local)
    dist.init_process_group("gloo")
    return World(dist.get_rank(), size, torch.device("cpu"))


def device_name(world: World) -> str:
    return torch.cuda.get_device_name(world.device) if world.device.type == "cuda" else "cpu"


# -------------------------------------------------------------------------------------------- inputs
def make_inputs(n: int, d: int, vocab: tuple[int, int, int], dtype: torch.dtype, world: World, seed: int, *,
                pad: float = 0.05, weight_seed: int | None = None, unigram: bool = False):
    """Hidden states (n, d), this rank's weight rows for ids ``[start, end)`` of V, targets with round(pad*n) ignored.

    Everything is drawn on the device (a 256k x 4096 weight drawn on the host takes seconds). The weight
    rows come from their own seed and slice start, so TP ranks draw disjoint slices of one matrix.
    ``unigram`` gives every hidden state a constant feature whose weight is -log(1 + id): logits carry a
    Zipf unigram prior, as in a trained model with a frequency-sorted vocabulary (ids early in the vocab
    have higher mean logits; at TP = 2 the two halves' mean logits are about 2 log 2 apart).
    """
    v, start, end = vocab
    gen = torch.Generator(device=world.device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen, device=world.device)  # (N, D)
    targets = torch.randint(0, v, (n,), generator=gen, device=world.device)  # (N,)
    targets[torch.randperm(n, generator=gen, device=world.device)[:round(pad * n)]] = IGNORE
    weight_seed = seed if weight_seed is None else weight_seed
    wgen = torch.Generator(device=world.device).manual_seed(weight_seed * 1_000_003 + start)
    weight = torch.randn(end - start, d, generator=wgen, device=world.device) * (2 / d ** 0.5)  # (V/TP, D)
    if unigram:
        hidden[:, 0] = 1.0
        weight[:, 0] = -torch.arange(start, end, device=world.device).log1p()
    return hidden.to(dtype), nn.Parameter(weight.to(dtype)), targets


class ExampleInputs:
    """Hidden states, output weight and targets of the example hybrid model after ``steps`` of training on the
    C++ corpus (10% of each row padded): what a guard meets in a real run, a peaked softmax over large
    logits, where N(0, 1) draws give a flat one. Each draw is the next training batch at the trained state.
    """

    def __init__(self, steps: int, d_model: int, seq_len: int, batch_size: int, world: World) -> None:
        from ce_guard.demos.data import CppTokenDataModule
        from ce_guard.demos.hybrid import HybridConfig, HybridLM, LinearCrossEntropy

        torch.manual_seed(0)
        data = CppTokenDataModule(seq_len=seq_len, batch_size=batch_size, pad_fraction=0.1)
        data.prepare_data()
        data.setup("fit")
        config = HybridConfig(vocab_size=data.vocab_size, d_model=d_model, layer_pattern="M*M-", n_heads=4,
                              n_kv_heads=2, mamba_n_heads=4, mamba_head_dim=d_model // 2, mamba_n_groups=2,
                              mamba_d_state=32, max_seq_len=seq_len)
        self.model = HybridLM(config, lambda c: LinearCrossEntropy(c.d_model, c.vocab_size)).to(world.device)
        self.batches, self.world = itertools.cycle(data.train_dataloader()), world
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.1)
        for _ in range(steps):
            input_ids, targets = (t.to(world.device) for t in next(self.batches))
            loss = self.model(input_ids, targets)
            loss.backward()
            self.train_loss = float(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        self.shape = (seq_len * batch_size, d_model, data.vocab_size)

    def draw(self, dtype: torch.dtype) -> tuple[torch.Tensor, nn.Parameter, torch.Tensor]:
        """The next batch's (N, D) hidden states, this rank's weight rows and the (N,) targets, in ``dtype``."""
        input_ids, targets = (t.to(self.world.device) for t in next(self.batches))
        start, end = self.world.vocab_slice(self.shape[2])
        with torch.no_grad():
            hidden = self.model.forward_hidden(input_ids).reshape(-1, self.shape[1])  # (N, D)
            weight = self.model.output.weight[start:end].detach().to(dtype).clone()    # (V/TP, D)
        return hidden.to(dtype), nn.Parameter(weight), targets.reshape(-1)


def replicate(world: World, *tensors: torch.Tensor) -> None:
    """Make tokens identical over the TP group: the ``[S,B,V/TP]`` layout's precondition, not left to RNG luck."""
    if world.size > 1:
        for t in tensors:
            dist.broadcast(t, src=0)


# --------------------------------------------------------------------------------------------- check
def run_check(layer: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[CheckResult, int | None]:
    """Forward + backward of ``layer``, then ``check_seam``.

    Also returns the token chunk ce_guard's layer used: it keeps it on its autograd node (the Function's
    ctx); peers' nodes have none.
    """
    h = hidden.detach().requires_grad_()
    layer.weight.grad = None
    loss = layer(h, targets)
    token_chunk = getattr(loss.grad_fn, "token_chunk", None)
    loss.backward()
    fused = SeamOutputs(loss=loss.detach(), grad_hidden=h.grad, grad_weight=layer.weight.grad)
    record = SeamRecord(hidden=hidden, weight=layer.weight.detach(), targets=targets, fused=fused, upstream=1.0)
    result = check_seam(record, layer.ce_contract)
    layer.weight.grad = None
    return result, token_chunk


MARGINS = ("loss", "dh", "dw", "softmax")  # error / budget per compared quantity, the softmax's per-token spread last


def margins(result: CheckResult) -> dict[str, float]:
    """The check's logged margins (``ce_guard.diagnosis.margins``) under this table's short names; 0 where not measured."""
    m = diagnosis.margins(result.report)
    return {"loss": m["loss"], "dh": m["grad_hidden"] or 0.0, "dw": m["grad_weight"] or 0.0,
            "softmax": m["softmax"] or 0.0}


class Clock:
    """``--max-seconds`` for a loop of unequal steps: stop before a step whose last run would not fit."""

    def __init__(self, max_seconds: float, world: World) -> None:
        self.started, self.max_seconds, self.world = time.time(), max_seconds, world
        self.last: dict[object, float] = {}

    def fits(self, kind: object) -> bool:
        left = self.max_seconds - (time.time() - self.started)
        return not self.world.any(self.last.get(kind, 0.0) > left)

    def record(self, kind: object, seconds: float) -> None:
        self.last[kind] = seconds

    @property
    def elapsed(self) -> float:
        return time.time() - self.started


# -------------------------------------------------------------------------------------- false alarms
def correct_paths(d: int, contract: CEContract, weight: nn.Parameter, token_chunk: int | None, world: World,
                  wanted: list[str]) -> dict[str, nn.Module]:
    """The correct fused paths for these inputs; peers only at TP = 1 and only for the default chunk."""
    out = {}
    if "ce_guard" in wanted:
        out["ce_guard fused"] = FusedLinearCrossEntropy(d, contract, weight=weight, token_chunk=token_chunk)
    if world.size > 1 or token_chunk is not None:
        return out
    v = contract.vocab_size
    if "liger" in wanted and weight.is_cuda and importlib.util.find_spec("liger_kernel") is not None:
        from ce_guard.adapters import LigerFusedLinearCrossEntropy

        # accum_dtype=fp32: the adapter then declares fp32 accumulators, the same promise as ours.
        out["Liger FLCE fp32"] = LigerFusedLinearCrossEntropy(d, v, weight=weight, accum_dtype=torch.float32)
    # torch 2.13's chunked path on CPU is not a correct path: it returns a wrong bf16 loss
    # (tests/test_adapters_in_the_wild.py), and its fp32 dL/dh error grows with V past the native path's
    # (docs/benchmarks.md, "Found in the wild"). On CUDA it counts.
    if ("torch" in wanted and hasattr(torch.nn.functional, "linear_cross_entropy")
            and weight.is_cuda):
        from ce_guard.adapters import TorchLinearCrossEntropy

        out["F.linear_cross_entropy"] = TorchLinearCrossEntropy(d, v, weight=weight)
    if "fla" in wanted and weight.is_cuda and importlib.util.find_spec("fla") is not None:
        from ce_guard.fla_adapter import FlaFusedLinearCrossEntropy

        out["fla FLCE"] = FlaFusedLinearCrossEntropy(d, v, weight=weight)
        # fla's hybrid models' factor: the penalty's gradient then sits in the budget beside the loss's
        out["fla FLCE + L2-warp 1e-4"] = FlaFusedLinearCrossEntropy(d, v, weight=weight, l2_warp=1e-4)
    if "te" in wanted and weight.is_cuda:
        from ce_guard.te_adapter import TransformerEngineCrossEntropy

        out["TE parallel_cross_entropy"] = TransformerEngineCrossEntropy(
            d, v, weight=weight, parallel_cross_entropy=te_parallel_cross_entropy())
    return out


def te_parallel_cross_entropy():
    """Transformer Engine's installed ``parallel_cross_entropy``, else the newest pinned wheel's (TE's Triton
    files need only torch and triton; the full package needs its CUDA libraries)."""
    if importlib.util.find_spec("transformer_engine") is not None:
        return None  # the adapter imports it
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import te_wheels

    return te_wheels.load(te_wheels.pinned_versions()[-1]).parallel_cross_entropy


def grid_shapes(args) -> list[tuple[int, int, int]]:
    if args.shapes:
        return [tuple(int(x) for x in s.split("x")) for s in args.shapes]  # NxDxV
    return [(n, args.hidden, v) for v in args.vocab for n in args.tokens]


def false_alarms(args, world: World) -> dict:
    chunks = [None if c == "auto" else int(c) for c in args.token_chunk]
    example = None
    if args.inputs == "example":
        example = ExampleInputs(args.example_steps, args.example_d_model, args.example_seq_len, args.example_batch,
                                world)
        if world.rank == 0:
            print(f"example model trained {args.example_steps} steps, loss {example.train_loss:.3f}", flush=True)
    grid = list(itertools.product(args.dtypes, [example.shape] if example else grid_shapes(args), chunks))
    samples: dict[tuple, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    verdicts: Counter = Counter()
    alarms, disagreements, skipped = [], [], {}
    checks, seed, rounds, stopped = 0, 0, 0, "checks"
    clock = Clock(args.max_seconds, world)
    while checks < args.checks and grid:
        for point in list(grid):
            dtype_name, (n, d, v), token_chunk = point
            if checks >= args.checks:
                break
            if not clock.fits(point):
                stopped = "max_seconds"
                break
            started = time.time()
            seed += 1
            start, end = world.vocab_slice(v)
            try:
                if example:
                    hidden, weight, targets = example.draw(getattr(torch, dtype_name))
                else:
                    hidden, weight, targets = make_inputs(n, d, (v, start, end), getattr(torch, dtype_name), world, seed)
                replicate(world, hidden, targets)
                contract = CEContract(vocab_size=v) if world.size == 1 else CEContract(
                    vocab_size=v, layout="[S,B,V/TP]", vocab_start=start, vocab_end=end, tp_group=world.group)
                for name, layer in correct_paths(d, contract, weight, token_chunk, world, args.paths).items():
                    path_started = time.time()
                    result, used_chunk = run_check(layer, hidden, targets)
                    mine = (result.diagnosis.cause.value, result.diagnosis.drift, margins(result))
                    ranks = world.gather(mine)
                    key = (name + (" (example model)" if example else ""), dtype_name, world.size, n, d, v, token_chunk)
                    cause = ranks[0][0]
                    if len({c for c, _, _ in ranks}) > 1:
                        disagreements.append({"key": list(key), "seed": seed, "causes": [c for c, _, _ in ranks]})
                    drift = any(dr for _, dr, _ in ranks)
                    verdicts[cause if not drift else next(c for c, dr, _ in ranks if dr)] += 1
                    s = samples[key]
                    for part in MARGINS:
                        s[f"margin_{part}"].append(max(m[part] for _, _, m in ranks))
                    b = result.report.budget
                    s["budget_loss"].append(b.loss_rel)
                    s["budget_dh"].append(b.grad_hidden_rel)
                    s["budget_dw"].append(b.grad_weight_rel)
                    s["loss_ref"].append(result.report.loss_ref)
                    s["err_loss"].append(result.report.loss_rel_err)
                    s["err_dh"].append(result.report.grad_hidden_rel_err or 0.0)
                    s["err_dw"].append(result.report.grad_weight_rel_err or 0.0)
                    s["token_chunk"].append(used_chunk)
                    s["seconds"].append(time.time() - path_started)
                    if drift:
                        alarms.append({"key": list(key), "seed": seed, "summary": result.diagnosis.summary})
                    checks += 1
                del hidden, weight, targets
            except torch.OutOfMemoryError as err:  # one process only: a rank that skips alone would hang the others
                if world.size > 1:
                    raise
                skipped[str(point)] = f"out of memory: {str(err).splitlines()[0]}"
                grid.remove(point)
                torch.cuda.empty_cache()
            clock.record(point, time.time() - started)
            result = _false_alarm_result(args, world, checks, verdicts, alarms, disagreements, skipped, samples,
                                         rounds, "running", clock)
            write_outputs(result, args, world, false_alarm_table)  # a killed run still leaves every check so far
        else:
            rounds += 1
            if world.rank == 0:
                drift = sum(verdicts.values()) - verdicts["within_budget"]
                print(f"round {rounds}: {checks} checks, {drift} drift, {clock.elapsed:.0f}s", flush=True)
            continue
        break
    return _false_alarm_result(args, world, checks, verdicts, alarms, disagreements, skipped, samples, rounds,
                               stopped, clock)


def _false_alarm_result(args, world, checks, verdicts, alarms, disagreements, skipped, samples, rounds, stopped,
                        clock) -> dict:
    return {"mode": "false-alarms", "world_size": world.size, "checks": checks, "verdicts": dict(verdicts),
            "drift_verdicts": sum(verdicts.values()) - verdicts["within_budget"], "false_alarms": alarms,
            "rank_disagreements": disagreements, "skipped": skipped, "rounds": rounds, "stopped": stopped,
            "seconds": clock.elapsed, "keys": [_summarize(key, s) for key, s in samples.items()],
            **_environment(world), "args": vars(args)}


def _summarize(key: tuple, s: dict[str, list]) -> dict:
    path, dtype, tp, n, d, v, token_chunk = key
    used = Counter(c for c in s["token_chunk"] if c is not None)
    chunk = used.most_common(1)[0][0] if used else None
    med = statistics.median
    return {
        "path": path, "dtype": dtype, "tp": tp, "tokens": n, "hidden": d, "vocab": v,
        "token_chunk_arg": token_chunk or "auto", "token_chunk": chunk,
        "chunks": math.ceil(n / chunk) if chunk else None,  # chunks over all N (the CUDA kernel skips ignored rows)
        "checks": len(s["seconds"]),
        "budget": {p: med(s[f"budget_{p}"]) for p in ("loss", "dh", "dw")},
        "budget_range": {p: [min(s[f"budget_{p}"]), max(s[f"budget_{p}"])] for p in ("loss", "dh", "dw")},
        "loss_ref_range": [min(s["loss_ref"]), max(s["loss_ref"])],  # the loss itself: a relative budget follows it
        "err_median": {p: med(s[f"err_{p}"]) for p in ("loss", "dh", "dw")},
        "err_max": {p: max(s[f"err_{p}"]) for p in ("loss", "dh", "dw")},
        "margin_max": {p: max(s[f"margin_{p}"]) for p in MARGINS},
        "margin_median": {p: med(s[f"margin_{p}"]) for p in MARGINS},
        "worst_margin": max(max(s[f"margin_{p}"]) for p in MARGINS),
        "seconds_per_check": med(s["seconds"]),
    }


def _spread(ranges: dict[str, list[float]]) -> dict[str, float]:
    """How far the budget moved over a key's checks: largest / smallest, per compared quantity."""
    return {p: high / low for p, (low, high) in ranges.items()}


def false_alarm_table(result: dict) -> str:
    head = (f"{result['checks']} checks, {result['drift_verdicts']} drift verdicts ({result['device']},"
            f" torch {result['torch']}, {result['world_size']} rank(s), stopped by {result['stopped']},"
            f" {result['seconds']:.0f} s)\n\n"
            "| path | dtype | TP | N | D | V | chunks | checks | budget loss / dL/dh / dL/dW"
            " | budget max / min | median err/budget loss / dL/dh / dL/dW / softmax"
            " | max err/budget loss / dL/dh / dL/dW / softmax | s/check |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    rows = sorted(result["keys"], key=lambda k: (k["path"], k["dtype"], k["tp"], k["vocab"], k["tokens"],
                                                  k["hidden"], k["chunks"] or 0))
    def joined(values: dict, fmt: str, parts=("loss", "dh", "dw")) -> str:
        return " / ".join(format(values[p], fmt) for p in parts)

    lines = [f"| {k['path']} | {k['dtype']} | {k['tp']} | {k['tokens']} | {k['hidden']} | {k['vocab']}"
             f" | {k['chunks'] or '-'} | {k['checks']} | {joined(k['budget'], '.1e')} | {joined(_spread(k['budget_range']), '.2f')}"
             f" | {joined(k['margin_median'], '.2f', MARGINS)} | {joined(k['margin_max'], '.2f', MARGINS)}"
             f" | {k['seconds_per_check']:.2f} |"
             for k in rows]
    return head + "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- power
@dataclass(frozen=True)
class Case:
    """One check of one fault at one magnitude: the layer (declaring its honest contract) and its inputs."""

    layer: nn.Module
    hidden: torch.Tensor
    targets: torch.Tensor


@dataclass(frozen=True)
class Ladder:
    """One fault at growing magnitude, injected by ``switch`` (a row of ``ce_guard.testing.INJECTIONS``)."""

    fault: str
    setting: str  # "TP=1", "TP=2" or "DP=2"
    unit: str
    magnitudes: list
    switch: str
    build: Callable[[object, torch.dtype, int], Case]  # (magnitude, dtype, seed) -> Case

    @property
    def expected(self) -> str:
        """The cause the diagnosis should name."""
        return injection(self.switch).cause.value


def one_rank_ladders(n: int, d: int, v: int, world: World, example: ExampleInputs | None = None) -> list[Ladder]:
    """Faults a single rank can commit, in ce_guard's fused layer (whole vocabulary on one rank), on N(0, 1)
    draws or, with ``example``, on the example model's next batches (their padding is its own 10%, so the
    padding ladder, whose magnitude is the pad fraction of a draw, runs on random draws only)."""
    vocab = (v, 0, v)

    def draw(dtype, seed, pad=0.05):
        return example.draw(dtype) if example else make_inputs(n, d, vocab, dtype, world, seed, pad=pad)

    def layer(weight, contract=None, **kwargs):
        return FaultyFusedLinearCrossEntropy(d, contract or CEContract(vocab_size=v), weight=weight, **kwargs)

    def scaled(m, dtype, seed):  # the layer's grad_scale fault: the factor enters before any rounding
        hidden, weight, targets = draw(dtype, seed)
        return Case(layer(weight, fault="grad_scale", fault_scale=m), hidden, targets)

    def bf16_accumulators(chunks, dtype, seed):
        hidden, weight, targets = draw(dtype, seed)
        faulty = layer(weight, fault="bf16_accumulators", token_chunk=math.ceil(n / chunks))
        return Case(faulty, hidden, targets)

    def missing_z_loss(z, dtype, seed):
        hidden, weight, targets = draw(dtype, seed)
        faulty = layer(weight, CEContract(vocab_size=v, z_loss=z), fault="missing_z_loss")
        return Case(faulty, hidden, targets)

    def padding_in_denominator(pad, dtype, seed):
        hidden, weight, targets = draw(dtype, seed, pad=pad)
        return Case(layer(weight, fault="ignore_in_denominator"), hidden, targets)

    ladders = [
        Ladder("loss and gradients scaled by s (the grad_scale fault)", "TP=1", "s",
               [1.0001, 1.001, 1.002, 1.003, 1.01, 1.03, 1.05, 1.1, 1.3, 2], "grad_scale", scaled),
        Ladder("bf16 accumulators under an fp32 contract", "TP=1", "token chunks", [1, 4, 16, 64, 256],
               "bf16_accumulators", bf16_accumulators),
        Ladder("z-loss dropped", "TP=1", "z", [1e-7, 1e-6, 1e-5, 1e-4, 1e-3], "missing_z_loss", missing_z_loss),
    ]
    if example is None:
        ladders.append(Ladder("padding counted in the mean's divisor", "TP=1", "pad fraction",
                              [0.001, 0.003, 0.01, 0.03, 0.1], "ignore_in_denominator", padding_in_denominator))
    return ladders


def two_rank_ladders(n: int, d: int, v: int, world: World) -> list[Ladder]:
    """Faults that need 2 ranks: the vocab-parallel ones at TP = 2, local normalisation at DP = 2."""
    start, end = world.vocab_slice(v)

    def tp_case(m, dtype, seed, *, fault, contract_options=None, unigram=False, boundary_tokens=0, **kwargs):
        hidden, weight, targets = make_inputs(n, d, (v, start, end), dtype, world, seed, unigram=unigram)
        if boundary_tokens:  # exactly this many targets sit on the first slice's end (the id rank 0 must not own)
            edge = math.ceil(v / world.size)
            targets[targets == edge] = edge + 1
            targets[:boundary_tokens] = edge
        replicate(world, hidden, targets)
        contract = CEContract(vocab_size=v, layout="[S,B,V/TP]", vocab_start=start, vocab_end=end,
                              tp_group=world.group, **(contract_options or {}))
        return Case(FaultyFusedLinearCrossEntropy(d, contract, weight=weight, fault=fault, **kwargs), hidden, targets)

    def smoothing(unigram):
        return lambda eps, dtype, seed: tp_case(eps, dtype, seed, fault="smoothing_local_vocab",
                                                contract_options={"label_smoothing": eps}, unigram=unigram)

    def local_normalization(extra_pad, dtype, seed):
        # DP = 2: each rank its own tokens (seed + rank), one replicated weight; rank 1 pads extra_pad more.
        pad = 0.05 + (extra_pad if world.rank == 1 else 0.0)
        hidden, weight, targets = make_inputs(n, d, (v, 0, v), dtype, world, seed + world.rank, pad=pad,
                                              weight_seed=seed)
        contract = CEContract(vocab_size=v, normalize_by="global_tokens", token_group=world.group)
        return Case(FaultyFusedLinearCrossEntropy(d, contract, weight=weight, fault="local_normalization"),
                    hidden, targets)

    on = ["on"]
    return [
        Ladder("label smoothing over the local V, Zipf unigram logits", "TP=2", "eps",
               [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3], "smoothing_local_vocab", smoothing(True)),
        Ladder("label smoothing over the local V, zero-mean logits", "TP=2", "eps",
               [1e-3, 1e-2, 0.1, 0.3], "smoothing_local_vocab", smoothing(False)),
        Ladder("target == slice end admitted (off by one)", "TP=2", "boundary-target tokens", [1, 2, 4, 16, 64],
               "partition_off_by_one", lambda k, dt, s: tp_case(k, dt, s, fault="partition_off_by_one",
                                                                boundary_tokens=k)),
        Ladder("foreign targets clamped into the slice (unmasked)", "TP=2", "", on, "unmasked_partition_targets",
               lambda m, dt, s: tp_case(m, dt, s, fault="unmasked_partition_targets")),
        Ladder("denominator summed over TP twice (gathered logits)", "TP=2", "", on, "gathered_logits_log_tp",
               lambda m, dt, s: tp_case(m, dt, s, fault="gathered_logits_log_tp")),
        Ladder("loss and gradients times k = 2 at TP = 2", "TP=2", "", on, "grad_scale",
               lambda m, dt, s: tp_case(m, dt, s, fault="grad_scale", fault_scale=2)),
        Ladder("local normalisation, rank 1 pads more", "DP=2", "extra pad fraction", [0.001, 0.003, 0.01, 0.03, 0.1],
               "local_normalization", local_normalization),
    ]


def power(args, world: World) -> dict:
    example = None
    if args.inputs == "example":
        if world.size > 1:
            raise SystemExit("power --inputs example runs the single-rank ladders: launch it without torchrun.")
        example = ExampleInputs(args.example_steps, args.example_d_model, args.example_seq_len, args.example_batch,
                                world)
        print(f"example model trained {args.example_steps} steps, loss {example.train_loss:.3f}", flush=True)
    n, d, v = example.shape if example else grid_shapes(args)[0]
    ladders = one_rank_ladders(n, d, v, world, example) if world.size == 1 else two_rank_ladders(n, d, v, world)
    if args.ladders:
        ladders = [ladder for ladder in ladders if any(word in ladder.fault for word in args.ladders)]
    rows, stopped = [], "done"
    clock = Clock(args.max_seconds, world)
    for ladder, dtype_name in itertools.product(ladders, args.dtypes):
        for magnitude in ladder.magnitudes:
            if not clock.fits(ladder.fault):
                stopped = "max_seconds"
                break
            started = time.time()
            causes, flagged_at, summary, excess = Counter(), [], None, []
            for repeat in range(args.repeats):
                case = ladder.build(magnitude, getattr(torch, dtype_name), 7 + 7919 * repeat)
                result, _ = run_check(case.layer, case.hidden, case.targets)
                ranks = world.gather((result.diagnosis.cause.value, result.diagnosis.drift, result.diagnosis.summary))
                excess.append(margins(result))
                drifting = [(c, s) for c, dr, s in ranks if dr]
                cause = drifting[0][0] if drifting else ranks[0][0]
                causes[cause] += 1
                if drifting:
                    flagged_at.append(repeat + 1)
                    summary = summary or drifting[0][1]
            rows.append({"fault": ladder.fault, "setting": ladder.setting, "dtype": dtype_name, "unit": ladder.unit,
                         "magnitude": magnitude, "expected": ladder.expected, "checks": args.repeats,
                         "flagged": len(flagged_at), "first_flagged_check": flagged_at[0] if flagged_at else None,
                         "named": causes[ladder.expected], "causes": dict(causes), "summary": summary,
                         # rank 0's err / budget, median over the repeats: how far past the budget the fault lands
                         "margin_median": {p: statistics.median(m[p] for m in excess) for p in ("loss", "dh", "dw")}})
            clock.record(ladder.fault, time.time() - started)
            if world.rank == 0:
                print(f"{ladder.setting} {ladder.fault} ({dtype_name}) {magnitude}: {len(flagged_at)}/{args.repeats}"
                      f" flagged, {dict(causes)}", flush=True)
        else:
            write_outputs(_power_result(args, world, n, d, v, rows, "running", clock), args, world, power_table)
            continue
        break
    return _power_result(args, world, n, d, v, rows, stopped, clock)


def _power_result(args, world, n, d, v, rows, stopped, clock) -> dict:
    return {"mode": "power", "world_size": world.size, "tokens": n, "hidden": d, "vocab": v, "repeats": args.repeats,
            "results": rows, "stopped": stopped, "seconds": clock.elapsed, **_environment(world), "args": vars(args)}


def power_table(result: dict) -> str:
    """One row per fault and dtype: each magnitude's flagged count, and where flagging and naming become certain."""
    head = (f"N = {result['tokens']}, D = {result['hidden']}, V = {result['vocab']}, {result['repeats']} checks per"
            f" magnitude ({result['device']}, torch {result['torch']}, {result['world_size']} rank(s))\n\n"
            "| fault | setting | dtype | flagged / checks at each magnitude | flagged at every check from"
            " | named at every check from | named / flagged |\n|---|---|---|---|---|---|---|\n")
    groups: dict[tuple, list] = defaultdict(list)
    for row in result["results"]:
        groups[(row["fault"], row["setting"], row["dtype"])].append(row)
    lines = []
    for (fault, setting, dtype), rows in groups.items():
        unit = rows[0]["unit"]
        ladder = ", ".join(f"{r['magnitude']:g}: {r['flagged']}/{r['checks']}" if unit else
                           f"{r['flagged']}/{r['checks']} ({', '.join(f'{c} {k}' for c, k in r['causes'].items())})"
                           for r in rows)
        lines.append(f"| {fault} | {setting} | {dtype} | {(unit + ' ') if unit else ''}{ladder}"
                     f" | {_from(rows, 'flagged')} | {_from(rows, 'named')} `{rows[0]['expected']}`"
                     f" | {_named_share(rows)} |")
    detail = [("\n| fault | setting | dtype | magnitude | flagged | median err/budget loss / dL/dh / dL/dW"
               " | causes |\n|---|---|---|---|---|---|---|")]
    for r in result["results"]:
        m = r["margin_median"]
        detail.append(f"| {r['fault']} | {r['setting']} | {r['dtype']} | {r['unit']} {r['magnitude']}"
                      f" | {r['flagged']}/{r['checks']} | {m['loss']:.3g} / {m['dh']:.3g} / {m['dw']:.3g}"
                      f" | {', '.join(f'{c} {k}' for c, k in r['causes'].items())} |")
    return head + "\n".join(lines) + "\n" + "\n".join(detail) + "\n"


def _named_share(rows: list[dict]) -> str:
    """Of the checks that flagged the fault, over every magnitude: how many named its cause."""
    flagged = sum(r["flagged"] for r in rows)
    named = sum(r["named"] for r in rows)
    return f"{named}/{flagged} ({named / flagged:.0%})" if flagged else "-"


def _from(rows: list[dict], field: str) -> str:
    """The smallest magnitude from which every larger one is at R of R ('always' for an on/off fault), else 'never'."""
    certain = None
    for row in reversed(rows):
        if row[field] < row["checks"]:
            break
        certain = row
    if certain is None:
        return "never"
    return "always" if not certain["unit"] else f"{certain['magnitude']:g}"


# -------------------------------------------------------------------------------------------- output
def _environment(world: World) -> dict:
    liger = None
    if importlib.util.find_spec("liger_kernel") is not None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            liger = version("liger_kernel")
        except PackageNotFoundError:
            liger = "unknown"
    return {"device": device_name(world), "torch": torch.__version__, "liger_kernel": liger}


def write_outputs(result: dict, args, world: World, table: Callable[[dict], str]) -> None:
    if world.rank != 0:
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    if args.out_md:
        Path(args.out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_md).write_text(table(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["false-alarms", "power"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checks", type=int, default=2000, help="false-alarms: stop after this many checks")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--vocab", nargs="+", type=int, default=[32768])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1024])
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="NxDxV shapes instead of the --tokens x --vocab grid at --hidden (power: the first)")
    parser.add_argument("--token-chunk", nargs="+", default=["auto"],
                        help="ce_guard fused layer's token_chunk values ('auto' = the layer's own choice)")
    parser.add_argument("--paths", nargs="+", default=["ce_guard", "liger", "torch"],
                        choices=["ce_guard", "liger", "torch", "fla", "te"],
                        help="peers run on CUDA only; fla and te (Transformer Engine, from the pinned wheels when"
                             " not installed) on request")
    parser.add_argument("--inputs", choices=["random", "example"], default="random",
                        help="N(0, 1) draws over the grid, or the example model's hidden states, output weight and"
                             " targets after --example-steps of training (its shape replaces the grid; power: TP = 1)")
    parser.add_argument("--example-steps", type=int, default=200)
    parser.add_argument("--example-d-model", type=int, default=64)
    parser.add_argument("--example-seq-len", type=int, default=128)
    parser.add_argument("--example-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="power: checks (fresh inputs) per magnitude")
    parser.add_argument("--ladders", nargs="+", default=None,
                        help="power: only the ladders whose fault names contain one of these words")
    parser.add_argument("--max-seconds", type=float, default=math.inf)
    parser.add_argument("--out", required=True)
    parser.add_argument("--out-md", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    world = init_world(args.device)
    try:
        if args.mode == "false-alarms":
            write_outputs(false_alarms(args, world), args, world, false_alarm_table)
        else:
            write_outputs(power(args, world), args, world, power_table)
        if world.rank == 0:
            print(Path(args.out_md).read_text() if args.out_md else Path(args.out).read_text()[:2000])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
