#!/usr/bin/env bash
# The test command: sets up .venv (locked vLLM CPU stack + vllm-aser) and runs the whole suite, vLLM included.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not vllm"` for the fast offline part).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
source scripts/cpu_env.sh
python -m pytest tests -p no:cacheprovider "$@"
