#!/usr/bin/env bash
# Everything that needs GPUs, in one go (the numbers in docs/benchmarks.md come from this script):
#   GPU tests, the output-layer table, vocab-parallel TP scaling, the example model under TP / DP / TP x DP
#   with the guard (clean, then the local-normalisation fault), and the spike-detector comparison.
# Usage, from the repository root on a machine with 4 GPUs:
#   OUT=runs/gpu bash benchmarks/gpu_suite.sh [tests] [output_layer] [tp] [examples] [spike]   (default: all)
set -u
SECTIONS=${*:-tests output_layer tp examples spike}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
OUT=${OUT:-runs/gpu}
LOGS="$OUT/logs"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
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

if want spike; then
step "spike detectors vs the guard (one GPU, 1000 steps per fault)"
CUDA_VISIBLE_DEVICES=0 timeout 240 python benchmarks/spike_vs_guard.py --out "$LOGS/spike_vs_guard.json" \
  --d-model 256 --seq-len 256 --batch-size 8 --precision bf16-mixed > "$LOGS/spike_vs_guard.log" 2>&1
tail -4 "$LOGS/spike_vs_guard.log" >> "$OUT/summary.txt"
fi

step "done"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs
rm -rf "$LOGS"
