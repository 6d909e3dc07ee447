#!/usr/bin/env bash
# One prepared run for a CUDA GPU (e.g. one H200) with jax's CUDA wheels, ≤ 8 minutes:
#   1. the update-overhead table of benchmarks/optimizer_overhead.py at ranks 4, 16, 64
#      (Gemma-2B LoRA tree, every optimizer against optax.adamw, compile times too);
#   2. the Gemma 3 270M decoder-LM protocol of benchmarks/reproduce_gemma3.py at the
#      paper's 2000 steps, batch 16, on OpenBookQA for AdamW and LoRA-RITE, then the other
#      optimizers while the time lasts (--max-wall-min: no run starts after it; the json
#      keeps what finished, and the same command with --resume continues).
#
#   bash benchmarks/device_suite.sh [--dry-run] [OUT_DIR]     (run from the repo root)
#
# OUT_DIR (default benchmarks/results/device) gets: device.txt (GPU, jax, load),
# optimizer_overhead_gpu.md, reproduce_lora_rite_gemma3_gpu.{json,md,_lr.png,_loss.png},
# and one log per part. --dry-run: tiny sizes on the CPU (a random 1-layer Gemma, the
# toy LoRA tree), seconds; the test suite runs it. Environment: DATA (an LLM-Adapters
# folder; default: the packaged OpenBookQA slice), PYTHON (default python),
# GEMMA_WALL_MIN (default 5.5), OPTIMIZERS (after adamw,lora_rite), SUITE_LIMIT_S (480).
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY=1
  shift
fi
OUT="${1:-benchmarks/results/device}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

{
  echo "date: $(date -u +%FT%TZ)"
  echo "load: $(cat /proc/loadavg 2>/dev/null || echo n/a)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader || echo "nvidia-smi: not found"
  "$PY" -c "import jax; print('jax', jax.__version__, jax.default_backend(), jax.devices())"
} >"$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

if [[ $DRY == 1 ]]; then
  overhead=(--quick --ranks 4 --optimizers adamw lora_rite)
  gemma=(--model tiny --dry-run --optimizers adamw --grid 1e-3 --seeds 0 --no-zero-shot
    --ckpt-every 0)
else
  if [[ "$("$PY" -c 'import jax; print(jax.default_backend())')" != "gpu" ]]; then
    echo "device_suite.sh: jax sees no GPU (install jax[cuda12]); use --dry-run on a CPU" >&2
    exit 2
  fi
  overhead=(--ranks 4 16 64 --repeats 30)
  # Paper protocol (A.1) at 2000 steps, batch 16; the grid and seeds are cut to what
  # fits: the rate grid on validation at 2000 steps would alone take the whole budget.
  gemma=(--model gemma3-270m --combos openbookqa:16
    --optimizers "adamw,lora_rite${OPTIMIZERS:+,$OPTIMIZERS}"
    --grid 2e-4,1e-3 --extend-grid 0 --seeds 0,1 --grid-steps 300 --steps 2000
    --batch-size 16 --eval-batch-size 64 --val-size 200 --test-size 500
    --prompt-style instruction --max-len 160 --ckpt-every 500
    --max-wall-min "${GEMMA_WALL_MIN:-5.5}")
fi
if [[ -n "${DATA:-}" ]]; then
  gemma+=(--data "$DATA")
fi

"$PY" benchmarks/optimizer_overhead.py "${overhead[@]}" --out "$OUT/optimizer_overhead_gpu.md" \
  >"$OUT/optimizer_overhead.log" 2>&1
echo "overhead table: $OUT/optimizer_overhead_gpu.md ($(($(date +%s) - start)) s)"

# The whole suite stays within SUITE_LIMIT_S (default 480 s): the protocol is stopped at
# the limit; every finished run is already in the json (written atomically after each
# run), and the same command plus --resume continues from the last run checkpoint.
left=$((${SUITE_LIMIT_S:-480} - ($(date +%s) - start) - 10))
rc=0
timeout --signal=TERM "$((left > 30 ? left : 30))" \
  "$PY" benchmarks/reproduce_lora_rite.py "${gemma[@]}" --out-dir "$OUT" \
  --name reproduce_lora_rite_gemma3_gpu >"$OUT/reproduce_gemma3.log" 2>&1 || rc=$?
if [[ $rc == 124 ]]; then
  echo "gemma 3 protocol: stopped at the time limit; finished runs are in the json"
  "$PY" benchmarks/reproduce_lora_rite.py "${gemma[@]}" --out-dir "$OUT" \
    --name reproduce_lora_rite_gemma3_gpu --report-only >>"$OUT/reproduce_gemma3.log" 2>&1 || true
elif [[ $rc != 0 ]]; then
  echo "gemma 3 protocol failed (exit $rc): see $OUT/reproduce_gemma3.log" >&2
  exit "$rc"
fi
echo "gemma 3 protocol: $OUT/reproduce_lora_rite_gemma3_gpu.md ($(($(date +%s) - start)) s)"
