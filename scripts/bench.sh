#!/usr/bin/env bash
# Throughput (issue 6): sets up .venv, then `vllm bench throughput` for BF16 / W8A8 / W4A16 / ASER on SmolLM2-135M
# (add `--models smollm2 llama-1b-random` for the ~1B random Llama), then the serving load test.
# Results: docs/throughput/. Needs the machine to itself (timings).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
source scripts/cpu_env.sh
python benchmarks/throughput.py "$@"
python benchmarks/serve_load.py
