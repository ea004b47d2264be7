"""The fused layer's memory target, measured: a dW matmul that keeps its running sum as bf16 + a narrow low part.

The layer accumulates dL/dW over token chunks in fp32 (2.49 GB at V x D = 151936 x 4096), which alone
misses the 1.5 GB target; bf16 between chunks meets it but rounds dW once per chunk. In between: keep
the running dW as its bf16 rounding (the returned gradient itself) plus a low part of 8 or 4 bits per
element, in units of 2^-8 or 2^-4 of the bf16 value's last place, updated in the epilogue of the dW
matmul. cuBLAS has no such epilogue, so this script times a Triton matmul (Hopper tensor descriptors)
with it against cuBLAS, and measures its accuracy against float64 over several chunks. No part of
ce_guard uses it; docs/benchmarks.md says why ("The memory target").

    python benchmarks/bench_compensated_dw.py --out compensated_dw.json   # one Hopper GPU
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import triton
import triton.language as tl
from bench_output_layer import time_ms  # a sibling script: median of CUDA-event timings
from triton.tools.tensor_descriptor import TensorDescriptor

EPILOGUES = {"bf16": 0, "int8 low": 8, "int4 low": 4}  # low-part bits; 0 = a plain bf16 store


@triton.jit
def _low_unit_exponent(value, LOW_BITS: tl.constexpr):
    """Biased fp32 exponent of ulp_bf16(value) / 2^LOW_BITS (kept >= 1 for tiny values)."""
    exponent = (value.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.maximum(exponent, 8 + LOW_BITS) - 7 - LOW_BITS


@triton.jit
def _compensated_update(acc, high_ptr, low_ptr, rows, col0, M, N, FIRST: tl.constexpr, LOW_BITS: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr):
    """high + low += acc, then high = bf16 round-to-nearest-even of the sum and low = the rest, in low units."""
    cols = col0 + tl.arange(0, BN)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    high_at = high_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]  # int16 bits of the bf16 values
    if LOW_BITS == 8:
        low_at = low_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
        low_inside = inside
    else:  # two 4-bit parts per byte: columns 2j and 2j+1 share byte j
        pairs = col0 // 2 + tl.arange(0, BN // 2)
        low_at = low_ptr + rows[:, None].to(tl.int64) * (N // 2) + pairs[None, :]
        low_inside = (rows[:, None] < M) & (pairs[None, :] < N // 2)
    total = acc
    if not FIRST:
        high = (tl.load(high_at, mask=inside, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        if LOW_BITS == 8:
            low = tl.load(low_at, mask=inside, other=0).to(tl.float32)
        else:
            byte = tl.load(low_at, mask=low_inside, other=0).to(tl.int32)
            low = tl.reshape(tl.join((byte << 28) >> 28, (byte << 24) >> 28), [BM, BN]).to(tl.float32)
        unit = (_low_unit_exponent(high, LOW_BITS) << 23).to(tl.float32, bitcast=True)
        total = high + low * unit + acc
    bits = total.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # fp32 bits rounded to bf16, nearest even
    new_high = rounded.to(tl.float32, bitcast=True)
    inverse_unit = ((254 - _low_unit_exponent(new_high, LOW_BITS)) << 23).to(tl.float32, bitcast=True)
    low_max: tl.constexpr = (1 << (LOW_BITS - 1)) - 1
    new_low = tl.floor((total - new_high) * inverse_unit + 0.5)
    new_low = tl.minimum(tl.maximum(new_low, -low_max - 1), low_max).to(tl.int32)
    tl.store(high_at, (rounded >> 16).to(tl.int16), mask=inside)
    if LOW_BITS == 8:
        tl.store(low_at, new_low.to(tl.int8), mask=inside)
    else:
        even, odd = tl.split(tl.reshape(new_low, [BM, BN // 2, 2]))
        tl.store(low_at, ((even & 0xF) | ((odd & 0xF) << 4)).to(tl.int8), mask=low_inside)


@triton.jit
def dw_matmul(logit_grad_desc, hidden_desc, high_ptr, low_ptr, M, N, K, FIRST: tl.constexpr,
              LOW_BITS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NUM_SMS: tl.constexpr):
    """dW (M=V, N=D) (+)= logit_grad (K=n, M)^T @ hidden (K, N), persistent over output tiles."""
    tiles_n = tl.cdiv(N, BN)
    for tile in tl.range(tl.program_id(0), tl.cdiv(M, BM) * tiles_n, NUM_SMS, flatten=True):
        tile_m, tile_n = tile // tiles_n, tile % tiles_n
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(tl.cdiv(K, BK)):
            a = logit_grad_desc.load([k * BK, tile_m * BM])  # (BK, BM)
            b = hidden_desc.load([k * BK, tile_n * BN])  # (BK, BN)
            acc = tl.dot(a.T, b, acc)
        rows = tile_m * BM + tl.arange(0, BM)
        if LOW_BITS == 0:
            cols = tile_n * BN + tl.arange(0, BN)
            inside = (rows[:, None] < M) & (cols[None, :] < N)
            tl.store(high_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(tl.bfloat16), mask=inside)
        else:
            _compensated_update(acc, high_ptr, low_ptr, rows, tile_n * BN, M, N, FIRST, LOW_BITS, BM, BN)


class CompensatedDW:
    """Running dL/dW as bf16 ``high`` (the gradient itself) plus a ``low_bits`` low part per element."""

    def __init__(self, vocab: int, hidden_size: int, low_bits: int, config: tuple[int, ...], device):
        self.high = torch.zeros(vocab, hidden_size, dtype=torch.bfloat16, device=device)
        low_columns = {0: 0, 8: hidden_size, 4: hidden_size // 2}[low_bits]
        self.low = torch.zeros(vocab, low_columns, dtype=torch.int8, device=device)
        self.low_bits, self.config = low_bits, config
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count

    def add(self, logit_grad: torch.Tensor, hidden: torch.Tensor, *, first: bool) -> None:
        bm, bn, bk, warps, stages = self.config
        vocab, hidden_size = self.high.shape
        tiles = triton.cdiv(vocab, bm) * triton.cdiv(hidden_size, bn)
        grid = (min(self.num_sms, tiles),)
        high = self.high if self.low_bits == 0 else self.high.view(torch.int16)
        logit_grad_desc = TensorDescriptor.from_tensor(logit_grad, [bk, bm])
        hidden_desc = TensorDescriptor.from_tensor(hidden, [bk, bn])
        dw_matmul[grid](logit_grad_desc, hidden_desc, high, self.low, vocab, hidden_size, logit_grad.shape[0], FIRST=first, LOW_BITS=self.low_bits,
                        BM=bm, BN=bn, BK=bk, NUM_SMS=grid[0], num_warps=warps, num_stages=stages)


def chunk_inputs(n: int, vocab: int, hidden_size: int, device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)
    logit_grad = ((torch.rand(n, vocab, device=device, generator=g) - 0.3) * 1e-6).bfloat16()
    hidden = torch.randn(n, hidden_size, device=device, generator=g).bfloat16()
    return logit_grad, hidden


def time_chunks(vocab: int, hidden_size: int, chunks: list[int], configs: list[tuple[int, ...]], device) -> list[dict]:
    """Median ms of one chunk's dW update: cuBLAS (fp32 accumulator, bf16 store) and each Triton epilogue."""
    acc32 = torch.zeros(vocab, hidden_size, device=device)
    rows = []
    for n in chunks:
        logit_grad, hidden = chunk_inputs(n, vocab, hidden_size, device, seed=n)
        bf16_out = torch.empty(vocab, hidden_size, dtype=torch.bfloat16, device=device)
        timings = {
            "cuBLAS addmm into fp32 (the layer today)": time_ms(
                partial(torch.addmm, acc32, logit_grad.T, hidden, out=acc32, out_dtype=torch.float32), device, 3, 10),
            "cuBLAS mm, bf16 store": time_ms(partial(torch.mm, logit_grad.T, hidden, out=bf16_out), device, 3, 10),
        }
        for config in configs:
            for name, low_bits in EPILOGUES.items():
                dw = CompensatedDW(vocab, hidden_size, low_bits, config, device)
                timings[f"Triton {'x'.join(map(str, config))}, {name}"] = time_ms(
                    partial(dw.add, logit_grad, hidden, first=False), device, 3, 10)
        tflops = {name: 2 * n * vocab * hidden_size / (ms * 1e-3) / 1e12 for name, ms in timings.items()}
        rows.append({"tokens": n, "ms": timings, "tflops": tflops})
        for name, ms in timings.items():
            print(f"n={n:5d}  {name:55s} {ms:7.3f} ms  {tflops[name]:5.0f} TFLOP/s", flush=True)
    return rows


def accuracy(vocab: int, hidden_size: int, n_chunks: int, n: int, config: tuple[int, ...], device) -> dict:
    """Relative Frobenius error of dW after ``n_chunks`` updates against float64, for each accumulator."""
    inputs = [chunk_inputs(n, vocab, hidden_size, device, seed=1000 + i) for i in range(n_chunks)]
    exact = torch.zeros(vocab, hidden_size, dtype=torch.float64, device=device)
    acc32 = torch.zeros(vocab, hidden_size, device=device)
    acc16 = torch.zeros(vocab, hidden_size, dtype=torch.bfloat16, device=device)
    compensated = {bits: CompensatedDW(vocab, hidden_size, bits, config, device) for bits in (8, 4)}
    for i, (logit_grad, hidden) in enumerate(inputs):
        exact.addmm_(logit_grad.T.double(), hidden.double())
        torch.addmm(acc32, logit_grad.T, hidden, out=acc32, out_dtype=torch.float32)
        torch.addmm(acc16, logit_grad.T, hidden, out=acc16)
        for dw in compensated.values():
            dw.add(logit_grad, hidden, first=i == 0)
    norm = exact.norm()

    def err(dw: torch.Tensor) -> float:
        return float((dw.double() - exact).norm() / norm)

    fp32_rounded = acc32.bfloat16()
    result = {"chunks": n_chunks, "tokens_per_chunk": n, "fp32 accumulator, rounded once": err(fp32_rounded),
              "bf16 accumulator": err(acc16)}
    for bits, dw in compensated.items():
        result[f"bf16 + int{bits} low"] = err(dw.high)
        result[f"bf16 + int{bits} low: elements unlike fp32's rounding"] = float((dw.high != fp32_rounded).float().mean())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden-size", type=int, default=4096)
    parser.add_argument("--chunks", default="4096,3072,2560", help="tokens per chunk to time")
    parser.add_argument("--configs", default="128x256x64x8x3",
                        help="Triton tiles BMxBNxBKxWARPSxSTAGES, comma-separated (default: the best of a sweep)")
    parser.add_argument("--out", default="compensated_dw.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    print(torch.cuda.get_device_name(device), torch.__version__, "triton", triton.__version__, flush=True)
    timings = time_chunks(args.vocab, args.hidden_size, chunks, configs, device)
    errors = accuracy(args.vocab, args.hidden_size, 6, 2560, configs[0], device)
    print(json.dumps(errors, indent=1))
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                   "triton": triton.__version__, "timings": timings, "accuracy": errors}, f, indent=1)


if __name__ == "__main__":
    main()
