#!/usr/bin/env bash
# Wall time and peak RSS of quantizing SmolLM2-135M-Instruct with the default options (not a timed test).
#   bash benchmarks/quantize_smollm2.sh [extra aser-quantize options]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
source scripts/cpu_env.sh
assets=$(python examples/prepare_assets.py)
MODEL=$(python -c 'import json,sys; print(json.loads(sys.argv[1])["model"])' "$assets")
CALIB=$(python -c 'import json,sys; print(json.loads(sys.argv[1])["calib"])' "$assets")
OUT=$(mktemp -d)/smollm2-aser
trap 'rm -rf "$(dirname "$OUT")"' EXIT
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
/usr/bin/time -f "wall %e s, peak RSS %M KiB (aser-quantize, $*)" aser-quantize "$MODEL" "$OUT" --calib "$CALIB" --quiet "$@" >/dev/null
