#!/usr/bin/env bash
# The accuracy table: sets up .venv, fetches the model and text, runs benchmarks/accuracy_table.py.
# Hours on 2 CPU cores for every row; resumable (rows are cached in docs/accuracy/results.json by command).
# Extra arguments go to the runner, e.g. `bash scripts/eval.sh --only 'w4a8-(rtn|aser-b3)$'` or `--list`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_cpu_env.sh
source scripts/cpu_env.sh
python benchmarks/accuracy_table.py "$@"
