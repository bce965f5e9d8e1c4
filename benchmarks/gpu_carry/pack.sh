#!/bin/bash
# Builds .carry/ on the CPU machine for a lent GPU machine (no network, 64 MiB per call, bare after ~30 s idle):
#   .carry/part-00 .. part-NN   vLLM 0.26.0's CUDA stack (vllm-0.26.0-cuda.lock) pre-installed for Python 3.12,
#                               slimmed, tar.xz, split in 60 MiB pieces (one piece per device call)
#   .carry/site.sha256          checksum of the joined archive
#   .carry/tokenizer/           SmolLM2's tokenizer, for the random-weight models built on the device
# then rehearses here what go.sh does there: join, checksum, unpack, imports (vLLM 0.26 + the plugin) and the
# Marlin glue tests against vLLM 0.26's own MarlinLinearKernel. The device side: benchmarks/gpu_carry/go.sh.
#
#   bash benchmarks/gpu_carry/pack.sh          # ~5 min on 2 cores (downloads ~380 MiB once, cached in $W)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/benchmarks/gpu_carry
W=${W:-/tmp/vllm-carry}
CARRY=$ROOT/.carry
if [ -z "${PY312:-}" ]; then  # the first Python 3.12 that runs (pyenv shims may exist without one behind them)
  for c in python3.12 /root/.pyenv/versions/3.12*/bin/python3 /usr/bin/python3.12; do
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312=$c; break; fi
  done
fi
PIECE=${PIECE:-60M}
TOKENIZER=${TOKENIZER:-$HOME/.cache/vllm-aser/models/SmolLM2-135M-Instruct}

[ -n "${PY312:-}" ] || { echo "pack.sh: needs a Python 3.12 to resolve cp312 wheels (set PY312=...)" >&2; exit 2; }
[ -f "$TOKENIZER/tokenizer.json" ] || { echo "pack.sh: no tokenizer in $TOKENIZER (run examples/prepare_assets.py)" >&2; exit 2; }
mkdir -p "$W/wheels"
grep -v '^#' "$HERE/vllm-0.26.0-cuda.lock" | grep . > "$W/lock.txt"

echo "== 1. wheels for CPython 3.12 / manylinux x86-64 ($(wc -l < "$W/lock.txt") pins)"
PLAT=""
for tag in manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 \
           manylinux2014 manylinux1; do PLAT="$PLAT --platform ${tag}_x86_64"; done
"$PY312" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT \
  -d "$W/wheels" -r "$W/lock.txt" 2>&1 | { grep -v "is ignored: it is neither" || true; }

echo "== 2. pre-install into a plain tree, slim it"
rm -rf "$W/site"
"$PY312" -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$W"/wheels/*.whl
# Hopper runs FA3; FA2's kernels, the Rust CLI and xgrammar's static library are not needed for the run
rm -rf "$W/site/bin" "$W/site/vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$W/site/vllm/vllm-rs" \
       "$W/site/xgrammar/lib/libxgrammar.a"
find "$W/site" -name '*.so*' -type f | while read -r f; do
  if readelf -S "$f" 2>/dev/null | grep -q '\.debug_'; then strip --strip-debug "$f"; fi
done
# the plugin's entry point, so that vLLM finds `--quantization aser` (the repo itself travels as the work tree)
DIST="$W/site/vllm_aser-$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml").dist-info"
mkdir -p "$DIST"
printf 'Metadata-Version: 2.1\nName: vllm-aser\nVersion: %s\n' "${DIST##*-}" | sed 's/\.dist-info//' > "$DIST/METADATA"
printf '[vllm.general_plugins]\naser = vllm_aser:register\n' > "$DIST/entry_points.txt"
du -sh "$W/site"

echo "== 3. archive and pieces"
tar -C "$W/site" -cf - . | xz -T0 -6 > "$W/site.tar.xz"
rm -rf "$CARRY" && mkdir -p "$CARRY"
(cd "$W" && sha256sum site.tar.xz) > "$CARRY/site.sha256"
split -b "$PIECE" -d -a 2 "$W/site.tar.xz" "$CARRY/part-"
mkdir -p "$CARRY/tokenizer"
cp "$TOKENIZER"/tokenizer.json "$TOKENIZER"/tokenizer_config.json "$CARRY/tokenizer/"
cp "$TOKENIZER"/special_tokens_map.json "$CARRY/tokenizer/" 2>/dev/null || true
ls -l "$CARRY" "$CARRY/tokenizer"

echo "== 4. rehearsal: join, checksum, unpack (what go.sh does on the device)"
R="$W/rehearsal" && rm -rf "$R" && mkdir -p "$R/site"
cat "$CARRY"/part-* > "$R/site.tar.xz"
(cd "$R" && sha256sum -c "$CARRY/site.sha256")
tar -C "$R/site" -xJf "$R/site.tar.xz" && rm "$R/site.tar.xz"
INSTALLED=$(cd "$R/site" && ls -d ./*.dist-info | tr 'A-Z' 'a-z')
for pin in $(cat "$W/lock.txt"); do
  name=$(echo "${pin%%==*}" | tr '-' '_' | tr 'A-Z' 'a-z'); version=${pin##*==}
  grep -qxF "./${name}-${version}.dist-info" <<< "$INSTALLED" || { echo "missing after unpack: $pin" >&2; exit 1; }
done
test -f "$R/site/vllm/_C.abi3.so" && test -f "$R/site/vllm_aser-"*.dist-info/entry_points.txt
echo "all $(wc -l < "$W/lock.txt") pins unpacked, vLLM's CUDA library and the plugin entry point present"

echo "== 5. rehearsal: vLLM 0.26's Python with the plugin (this machine's Python 3.11 venv: no CUDA, no cp312 .so)"
mkdir -p "$R/vllm-only" && ln -sfn "$R/site/vllm" "$R/vllm-only/vllm"
VENV_PY=${VENV_PY:-$ROOT/.venv/bin/python}
(cd "$ROOT" && PYTHONPATH="$R/vllm-only:$ROOT" "$VENV_PY" - <<'PY'
import vllm
assert vllm.__version__ == "0.26.0", vllm.__version__
import vllm_aser.config  # registers --quantization aser
from vllm_aser import linear_method, moe_method  # noqa: F401
from vllm_aser.kernels import marlin_w4a8, select  # noqa: F401
print("vLLM", vllm.__version__, "+ the plugin: imports OK")
PY
)
(cd "$ROOT" && PYTHONPATH="$R/vllm-only:$ROOT" "$VENV_PY" -m pytest -q -p no:cacheprovider tests/test_marlin_w4a8.py)
echo "pack.sh: done. Device calls: see docs/CUDA.md ('The one-shot device run')."
