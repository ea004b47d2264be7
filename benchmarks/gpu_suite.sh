#!/usr/bin/env bash
# Everything that needs GPUs, in one go (the numbers in docs/benchmarks.md come from this script):
#   GPU tests, the output-layer table, vocab-parallel TP scaling, the example model under TP / DP / TP x DP
#   with the guard (clean, then the local-normalisation fault), the guard's calibration on large shapes, and
#   the spike-detector comparison; the example's speed with and without fla's kernels (one GPU: `speed`
#   for tokens/s and the kernel tests, `speed_val` for 300-step validation losses, `speed_guard` for the
#   guard's overhead on the fast step; each fits in one 10-minute call, fla's autotuning included).
# Usage, from the repository root on a machine with 4 GPUs:
#   OUT=runs/gpu bash benchmarks/gpu_suite.sh [tests] [output_layer] [tp] [examples] [calibrate] [spike]
#   (default: all; calibrate and spike take at most 5.7 and 5.5 minutes)
#   OUT=runs/gpu bash benchmarks/gpu_suite.sh speed | speed_val | speed_guard | speed_monitor   (needs the gpu extra)
#   OUT=runs/gpu bash benchmarks/gpu_suite.sh check_cost   (one check at the fast step's shape, timed and profiled)
set -u
SECTIONS=${*:-tests output_layer tp examples calibrate spike}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
OUT=${OUT:-runs/gpu}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
# fla autotunes its kernels for 1-2 minutes per shape on a fresh machine. Triton keeps each winner in its cache
# when asked; the winners (a few KB) are saved with the logs: unpack them into .triton and carry it to the next
# machine, which then compiles only the winners (verified across two H200 machines: no autotuning ran).
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton} TRITON_CACHE_AUTOTUNING=1
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/summary.txt"; }

if want tests; then
step "gpu tests"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_fused_kernel.py 2>&1 | tail -3 | tee -a "$OUT/summary.txt"
fi

if want output_layer; then
step "output layer (one GPU)"
timeout ${OUTPUT_LAYER_TIMEOUT:-300} python benchmarks/bench_output_layer.py ${OUTPUT_LAYER_ARGS:-} --out "$LOGS/output_layer.json" --out-md "$LOGS/output_layer.md" \
  > "$LOGS/output_layer.log" 2>&1
tail -20 "$LOGS/output_layer.log" >> "$OUT/summary.txt"
fi

if want tp; then
step "vocab-parallel fused layer, TP = 1 2 4"
for tp in 1 2 4; do
  [ "$tp" -le "$GPUS" ] || continue
  timeout 120 torchrun --standalone --nproc_per_node="$tp" benchmarks/bench_tp_scaling.py --out "$LOGS/tp$tp.json" \
    > "$LOGS/tp$tp.log" 2>&1
  tail -1 "$LOGS/tp$tp.log" >> "$OUT/summary.txt"
done
fi

if want examples; then
step "example model under ModelParallelStrategy with the guard"
# config:fault pairs; "clean" runs the config as it is. Local normalisation needs DP > 1 (with TP alone there is
# no second token count), so the TP-only config is also run with unmasked partition targets.
for run in ${EXAMPLE_RUNS:-gpu_dp2:clean gpu_dp2:local_normalization gpu_tp2:clean gpu_tp2:unmasked_partition_targets \
           gpu_tp2_dp2:clean gpu_tp2_dp2:local_normalization}; do
  cfg=${run%%:*}; fault=${run##*:}
  extra=(); [ "$fault" = clean ] || extra=(--model.fault="$fault" --data.pad_fraction=0.2)
  timeout 110 python examples/train_hybrid.py fit --config "configs/$cfg.yaml" "${extra[@]}" \
    --trainer.max_steps=${EXAMPLE_STEPS:-51} --trainer.default_root_dir="runs/$cfg-$fault" \
    > "$LOGS/$cfg-$fault.log" 2>&1
  echo "$cfg $fault exit=$?" >> "$OUT/summary.txt"
  grep -hE "drift|within_budget|checks|cause" "$LOGS/$cfg-$fault.log" | tail -6 >> "$OUT/summary.txt"
  find "runs/$cfg-$fault" -name receipts.jsonl -exec cp {} "$LOGS/$cfg-$fault.receipts.jsonl" \;
done
fi

if want calibrate; then
step "guard calibration: false alarms at V 32k-256k, N 1k-64k (1 GPU, Liger if importable; TP=2 on 2 GPUs), power"
# Each job stops itself at its --max-seconds (its JSON and table are rewritten after every check) and is killed
# 45 s later at the latest. With 4 GPUs three chains run side by side (GPU 0 | GPUs 1,2 | GPU 3), at most
# 5.7 minutes; with fewer GPUs one after another on shorter budgets, about 5.5 minutes.
BF16=(--dtypes bfloat16 --hidden 4096 --tokens 1024 8192 65536 --vocab 32768 131072 262144 --token-chunk auto 512)
FP32=(--dtypes float32 --hidden 1024 --tokens 1024 8192 65536 --vocab 32768 131072 262144 --token-chunk auto 512)
FA=(python benchmarks/calibrate_guard.py false-alarms --checks 1000000)
FA_TP2=(torchrun --standalone --nproc_per_node=2 benchmarks/calibrate_guard.py false-alarms --checks 1000000)
POWER=(python benchmarks/calibrate_guard.py power --shapes 8192x1024x131072 --repeats 3)
cal() {  # cal NAME DEVICES SECONDS COMMAND...
  local name=$1 devices=$2 seconds=$3; shift 3
  CUDA_VISIBLE_DEVICES=$devices timeout $((seconds + 45)) "$@" --max-seconds "$seconds" \
    --out "$LOGS/calibrate_$name.json" --out-md "$LOGS/calibrate_$name.md" > "$LOGS/calibrate_$name.log" 2>&1
  echo "calibrate $name exit=$?" >> "$OUT/summary.txt"
}
if [ "$GPUS" -ge 4 ]; then
  cal fa_bf16 0 270 "${FA[@]}" "${BF16[@]}" &
  { cal fa_tp2_bf16 1,2 140 "${FA_TP2[@]}" "${BF16[@]}"; cal fa_tp2_fp32 1,2 100 "${FA_TP2[@]}" "${FP32[@]}"; } &
  { cal fa_fp32 3 150 "${FA[@]}" "${FP32[@]}"; cal power 3 100 "${POWER[@]}"; } &
  wait
else
  cal fa_bf16 0 110 "${FA[@]}" "${BF16[@]}"
  cal fa_fp32 0 60 "${FA[@]}" "${FP32[@]}"
  cal power 0 50 "${POWER[@]}"
  if [ "$GPUS" -ge 2 ]; then
    cal fa_tp2_bf16 0,1 30 "${FA_TP2[@]}" "${BF16[@]}"
    cal fa_tp2_fp32 0,1 20 "${FA_TP2[@]}" "${FP32[@]}"
  fi
fi
for md in "$LOGS"/calibrate_*.md; do echo "$(basename "$md"): $(head -1 "$md")"; done >> "$OUT/summary.txt"
fi

if want spike; then
step "spike detectors vs the guard (1000 steps per fault, one fault per GPU side by side)"
# One process per fault on its own GPU; repro bundles (~200 MB per drifting check) stay out of the tarball.
SPIKE_FAULTS=${SPIKE_FAULTS:-grad_scale bf16_accumulators ignore_in_denominator missing_z_loss}
i=0
for fault in $SPIKE_FAULTS; do
  CUDA_VISIBLE_DEVICES=$((i % GPUS)) timeout 330 python benchmarks/spike_vs_guard.py --faults "$fault" \
    --out "$LOGS/spike_$fault.json" --run-dir "$OUT/spike_runs" \
    --d-model 256 --seq-len 256 --batch-size 8 --precision bf16-mixed > "$LOGS/spike_$fault.log" 2>&1 &
  i=$((i + 1))
done
wait
for fault in $SPIKE_FAULTS; do
  grep -h '^{"fault"' "$LOGS/spike_$fault.log" >> "$OUT/summary.txt" || echo "spike $fault: no result" >> "$OUT/summary.txt"
  cp "$OUT/spike_runs/$fault/ce_guard/receipts.jsonl" "$LOGS/spike_$fault.receipts.jsonl" 2>/dev/null
done
rm -rf "$OUT/spike_runs"
fi

SPEED=(--config configs/gpu_1.yaml)
if want speed; then
step "the example's kernel path: tokens/s side by side (plain scan, fla, compiled, compiled as CUDA graphs), then fla's tests"
timeout 330 python benchmarks/bench_example_speed.py "${SPEED[@]}" --variants torch fla fla_compile fla_compile_block_graphs --repeats 1 \
  --warmup 10 --measure 20 --profile 3 --out "$LOGS/speed.json" > "$LOGS/speed.log" 2>&1
grep -A5 "ms/step" "$LOGS/speed.log" >> "$OUT/summary.txt"
grep -A4 "device busy\|host syncs" "$LOGS/speed.log" >> "$OUT/summary.txt"
timeout 200 python -m pytest -v -p no:cacheprovider tests/test_gpu.py -k "fla or cuda_graphs" > "$LOGS/fla_tests.log" 2>&1
grep -E "PASSED|FAILED|ERROR|passed|failed" "$LOGS/fla_tests.log" >> "$OUT/summary.txt"
fi

if want speed_val; then
step "the example's kernel path: validation loss over 300 steps, plain and fla's compiled blocks as CUDA graphs, seeds 0 and 1"
timeout 560 python benchmarks/bench_example_speed.py val "${SPEED[@]}" --variants torch fla_compile_block_graphs --seeds 0 1 \
  --out "$LOGS/speed_val.json" > "$LOGS/speed_val.log" 2>&1
grep -E "seed [0-9]:|step [0-9]+:" "$LOGS/speed_val.log" >> "$OUT/summary.txt"
fi

if want speed_guard; then
step "the guard's overhead against the fast step (the config's compiled blocks as CUDA graphs; checks every 100 and 50)"
timeout 560 python benchmarks/bench_guard_overhead.py "${SPEED[@]}" --repeats 2 --out "$LOGS/guard_fast.json" \
  > "$LOGS/guard_fast.log" 2>&1
grep -A4 "per check" "$LOGS/guard_fast.log" >> "$OUT/summary.txt"
fi

if want speed_monitor; then
step "SeamHealthCallback's cost against the fast step (fits alternated without and with it, no check after step 0)"
timeout 300 python benchmarks/bench_guard_overhead.py "${SPEED[@]}" --monitor --repeats 2 --warmup 10 --measure 60 \
  --out "$LOGS/monitor_fast.json" > "$LOGS/monitor_fast.log" 2>&1
grep -E "monitor|mean step|median" "$LOGS/monitor_fast.log" | grep -v Warning | tail -12 >> "$OUT/summary.txt"
fi

if want check_cost; then
step "one check at the fast step's shape (8192 x 1024 x 100352, bf16): timed, profiled, its ops counted"
timeout 200 python benchmarks/bench_check_cost.py --shape 8192x1024x100352 --repeats 5 --profile --count-ops \
  --out "$LOGS/check_cost_gpu1.json" > "$LOGS/check_cost_gpu1.log" 2>&1
grep -E '"clean check"|ops_per|device busy|host syncs in' "$LOGS/check_cost_gpu1.log" >> "$OUT/summary.txt"
fi

step "done"
(cd "$TRITON_CACHE_DIR" 2>/dev/null && find . -name "*.autotune.json" | tar -czf "$OUT/triton_autotune.tgz" -T -)
tar -czf "$OUT/logs.tgz" -C "$OUT" logs
rm -rf "$LOGS"
