#!/usr/bin/env bash
# The test command: sets up .venv (locked vLLM CPU stack + vllm-aser) and runs the whole suite, vLLM included.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not vllm"` for the fast offline part).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
source scripts/cpu_env.sh
python -m pytest tests --ignore=tests/test_triton_kernels.py -p no:cacheprovider "$@"
# The Triton kernels, interpreted on CPU: TRITON_INTERPRET must be set before Triton is imported, and kept from
# the vLLM engines above, hence a second process. (Exit code 5 = the extra arguments selected none of them.)
TRITON_INTERPRET=1 python -m pytest tests/test_triton_kernels.py -p no:cacheprovider "$@" || [ $? -eq 5 ]
