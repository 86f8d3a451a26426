#!/usr/bin/env bash
# GPU readiness benchmark: ViT-B/16 + MLP gene tower, batch 256, bf16, channels_last, pinned
# memory, persistent loader workers; eager, then torch.compile. Sized for < 8 min on one H200
# (each run is capped at 210 s). Prints markdown rows for docs/benchmarks.md and writes
# benchmarks/results/gpu-*.json + gpu-latest.md.
#   bash benchmarks/gpu.sh            # on a GPU machine, from the repository root
#   bash benchmarks/gpu.sh --smoke    # CPU, seconds (what CI runs)
# Vectorised head-only trials (issue 20.4): K = 1, 4, 16, 64, 256 head-only configurations
# stacked in one process on the GPU vs one trial per process (4 processes at a time), one
# run capped at 540 s; writes benchmarks/results/gpu-vectorised.{json,log}:
#   bash benchmarks/gpu.sh vectorised          # on a GPU machine (run it on its own)
#   bash benchmarks/gpu.sh vectorised --smoke  # CPU, about a minute
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1
OUT=benchmarks/results
mkdir -p "$OUT"
if [ "${1:-}" = "vectorised" ]; then
  shift
  if [ "${1:-}" = "--smoke" ]; then
    exec "$PY" -m benchmarks.vectorised_trials --smoke --json "$OUT/gpu-vectorised-smoke.json"
  fi
  set +e
  timeout 540 "$PY" -m benchmarks.vectorised_trials --use-gpu --ks 1,4,16,64,256 \
    --concurrency 4 --baseline-sample 4 --json "$OUT/gpu-vectorised.json" "$@" 2>&1 \
    | tee "$OUT/gpu-vectorised.log"
  status=${PIPESTATUS[0]}
  [ "$status" -eq 0 ] || echo "vectorised run failed or timed out (exit $status)"
  exit "$status"
fi
if [ "${1:-}" = "--smoke" ]; then
  exec "$PY" benchmarks/gpu_bench.py --smoke --json "$OUT/gpu-smoke.json"
fi
"$PY" - <<'PYEOF'
import torch
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO GPU",
      "| torch", torch.__version__, "| cuda", torch.version.cuda)
PYEOF
{
  echo "| date | device | config | samples/s | step ms | split ms (data / forward / backward / optim / gather) | TFLOP/s | MFU | peak mem | loader workers |"
  echo "|---|---|---|---:|---:|---|---:|---:|---:|---:|"
  timeout 210 "$PY" benchmarks/gpu_bench.py --json "$OUT/gpu-eager.json" "$@" | tail -n 1 \
    || echo "| eager run failed or timed out (exit $?) |"
  timeout 240 "$PY" benchmarks/gpu_bench.py --compile --json "$OUT/gpu-compile.json" "$@" \
    | tail -n 1 || echo "| compile run failed or timed out (exit $?) |"
} | tee "$OUT/gpu-latest.md"
