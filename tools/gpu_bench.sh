#!/usr/bin/env bash
# One prepared benchmark for a lent H100/H200 (JAX and torch preinstalled, no network), done in <= 8 minutes.
#
# Measures the Llama-3.2-11B-Vision architecture with random bf16 weights (mme5_jax/configs/bench/gpu_11b.yaml: DoRA on
# mmE5's targets, full remat, 8 pairs of a 4-tile 448-px query + a text target): our train step (`mme5 bench`),
# then HF transformers + PEFT at the same batch with gradient checkpointing, each in its own process so the two
# never share GPU memory. Prints one table and leaves ours.json / torch.json in $OUT (default /tmp/gpu_bench).
#
#   tools/gpu_bench.sh [key=value ...]        e.g. tools/gpu_bench.sh adapter.kind=lora
#
# With DoRA (the default) HF + PEFT runs out of memory on an H200 at 8 pairs (its row says so); adapter.kind=lora
# gives both sides. Recorded runs: docs/benchmarks.md.
#
# Runs under $PYTHON (default python3, the interpreter that holds torch on the lent machines). If flax/optax/
# transformers/peft are missing there, carry wheels in tools/wheels/ (pip download them here); they are installed
# offline, without dependencies. Measured with the image's jax 0.11.2 and flax 0.12.12 carried as a wheel on
# PYTHONPATH (flax 0.12.8 does not import under jax 0.11.2).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_bench}"
mkdir -p "$OUT"
rm -f "$OUT/ours.json" "$OUT/torch.json"
START=$(date +%s)
PYTHON="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi unavailable"
if ! "$PYTHON" -c "import jax, flax, optax, yaml, tqdm, torch, transformers, peft" 2>/dev/null; then
  if [ -d tools/wheels ]; then
    "$PYTHON" -m pip install --no-index --no-deps --find-links tools/wheels flax optax transformers peft tqdm pyyaml 2>&1 | tail -2
  fi
  "$PYTHON" -c "import jax, flax, optax, yaml, tqdm, torch, transformers, peft" || { echo "missing packages (above)"; exit 2; }
fi
"$PYTHON" -c "import jax, flax, torch, transformers, peft; print('jax', jax.__version__, jax.devices()[0].device_kind, '| flax', flax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"

echo "== ours (mme5 bench gpu_11b $*) =="
XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout 290 \
  "$PYTHON" -m mme5_jax.cli bench gpu_11b "$@" --output "$OUT/ours.json" --no-progress
OURS_RC=$?

echo "== HF transformers + PEFT, same batch =="
REMAINING=$(( 470 - ($(date +%s) - START) ))
JAX_PLATFORMS=cpu timeout "$REMAINING" \
  "$PYTHON" tools/bench_vs_torch.py gpu_11b "$@" --torch-only --device cuda --gradient-checkpointing \
  --steps 5 --warmup 2 --output "$OUT/torch.json" > "$OUT/torch.log" 2>&1
TORCH_RC=$?
[ $TORCH_RC -ne 0 ] && [ $TORCH_RC -ne 3 ] && tail -5 "$OUT/torch.log"

JAX_PLATFORMS=cpu "$PYTHON" tools/bench_vs_torch.py --table "$OUT/ours.json" "$OUT/torch.json"
echo "elapsed $(( $(date +%s) - START )) s; ours rc=$OURS_RC, torch rc=$TORCH_RC"
