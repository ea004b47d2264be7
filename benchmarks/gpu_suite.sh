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
timeout 300 python benchmarks/bench_output_layer.py --out "$LOGS/output_layer.json" --out-md "$LOGS/output_layer.md" \
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
for cfg in ${EXAMPLE_CONFIGS:-}; do
  name=$(basename "$cfg" .yaml)
  timeout 150 python examples/train_hybrid.py fit --config "$cfg" --trainer.max_steps=${EXAMPLE_STEPS:-30} \
    > "$LOGS/$name.log" 2>&1
  echo "$name exit=$?" >> "$OUT/summary.txt"
  timeout 150 python examples/train_hybrid.py fit --config "$cfg" --config configs/faults/local_normalization.yaml \
    --trainer.max_steps=${EXAMPLE_STEPS:-30} > "$LOGS/${name}_local_normalization.log" 2>&1
  echo "$name + local_normalization exit=$?" >> "$OUT/summary.txt"
done
fi

if want spike; then
step "spike detectors vs the guard (one GPU, 1000 steps per fault)"
CUDA_VISIBLE_DEVICES=0 timeout 240 python benchmarks/spike_vs_guard.py --out "$LOGS/spike_vs_guard.json" \
  --d-model 256 --seq-len 256 --batch-size 8 --precision bf16-mixed > "$LOGS/spike_vs_guard.log" 2>&1
tail -4 "$LOGS/spike_vs_guard.log" >> "$OUT/summary.txt"
fi

step "done"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs $(cd "$OUT" && ls -d runs 2>/dev/null)
rm -rf "$LOGS"
