#!/bin/bash
# On the GPU machine, from the repo root (the device `run` tool's working directory). .carry/ is built on the CPU
# machine by pack.sh; each device call carries one piece (`carry: [".carry/part-NN"]`), and /tmp survives only
# while the machine stays warm (~30 s between calls), so the calls go back to back:
#
#   bash benchmarks/gpu_carry/go.sh piece              # calls carrying part-00 .. part-(N-1): keep it in /tmp/carry
#   bash benchmarks/gpu_carry/go.sh run [gpu_e2e args] # the call carrying the last piece + site.sha256 + tokenizer/:
#                                                      # join, verify, unpack to /tmp/site, run benchmarks/gpu_e2e.py
#   bash benchmarks/gpu_carry/go.sh again [gpu_e2e args]  # later calls while warm: the stack is already there
#
# Results land in $OUT (results.json, logs/, kernels/); the run stops starting work at --deadline-s (default below:
# what is left of a 600 s call after the unpack).
set -euo pipefail
REPO=$(pwd)
MODE=${1:?usage: go.sh piece|run|again [gpu_e2e.py args]}
shift
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/carry "$OUT"
START=$(date +%s)

facts() {
  echo "host: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(ldd --version 2>&1 | head -1)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -m pip list 2>/dev/null | grep -iE '^(numpy|transformers|tokenizers|safetensors|triton|tqdm|setuptools|packaging|pygments|rich) ' || true
}

if [ "$MODE" = piece ]; then
  cp .carry/part-* /tmp/carry/
  ls -l /tmp/carry
  facts | tee "$OUT/facts.txt"
  exit 0
fi

if [ "$MODE" = run ]; then
  cp .carry/part-* /tmp/carry/
  cat /tmp/carry/part-* > /tmp/site.tar.xz
  (cd /tmp && sha256sum -c "$REPO/.carry/site.sha256")
  rm -rf /tmp/site && mkdir -p /tmp/site
  if command -v xz >/dev/null; then tar -C /tmp/site -xJf /tmp/site.tar.xz
  else python3 -c "import tarfile; tarfile.open('/tmp/site.tar.xz').extractall('/tmp/site')"; fi
  rm -f /tmp/site.tar.xz /tmp/carry/part-*
  mkdir -p /tmp/tokenizer && cp -r .carry/tokenizer/. /tmp/tokenizer/
  echo "unpacked $(du -sh /tmp/site | cut -f1) in $(( $(date +%s) - START )) s"
elif [ "$MODE" != again ]; then
  echo "go.sh: unknown mode $MODE (piece, run or again)" >&2
  exit 2
fi
[ -d /tmp/site/vllm ] || { echo "go.sh: /tmp/site is gone (the machine went cold): carry the pieces again" >&2; exit 3; }

# offline vLLM from the unpacked tree (PYTHONPATH is inherited by vLLM's engine-core process)
export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_USE_FLASHINFER_SAMPLER=0  # FlashInfer is not carried
export VLLM_CACHE_ROOT=/tmp/vllm-cache TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache
export PYTHONUNBUFFERED=1
python3 -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, torch.cuda.get_device_name(0))"
DEADLINE=$(( ${CALL_LIMIT_S:-600} - 25 - ( $(date +%s) - START ) ))
python3 benchmarks/gpu_e2e.py --out "$OUT" --tokenizer /tmp/tokenizer --deadline-s "$DEADLINE" "$@"
