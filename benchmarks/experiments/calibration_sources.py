"""Does the calibration text matter? The shipped defaults on SmolLM2-135M-Instruct, calibrated on other text than
the State of the Union addresses, scored on the ablation table's held-out windows (benchmarks/accuracy_table.py).

Sources:
  wiki-tail  Wikipedia articles 010-106 of the evaluation sample. The scored windows come from the first three
             articles only, so no scored text is seen, but the source is the same: an in-domain upper bound,
             not a fair held-out row.
  self       text sampled from the model itself (first token uniform over the vocabulary, then top-p 0.95 at
             temperature 1), as data-free quantization methods do: no text needed at all.

    python benchmarks/experiments/calibration_sources.py [--sources wiki-tail self] [--samples 80] [--length 560]
                                             [--options="--mlp-hadamard 512"]
Writes docs/accuracy/calibration_sources.json (one record per source and extra options).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from accuracy_table import evaluate  # noqa: E402

OUT = ROOT / "docs" / "accuracy" / "calibration_sources.json"
FIRST_UNSCORED_ARTICLE = 10  # the 16 x 2048 scored Wikipedia tokens end inside article 003


def wiki_tail(assets: dict, dest: Path, **_) -> None:
    for path in sorted(Path(assets["eval"]["wikipedia"]).glob("*.txt")):
        if int(path.stem) >= FIRST_UNSCORED_ARTICLE:
            shutil.copy(path, dest / path.name)


def self_generated(assets: dict, dest: Path, samples: int, length: int, seed: int = 0) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["model"])
    model = AutoModelForCausalLM.from_pretrained(assets["model"], dtype=torch.float32).eval()
    torch.manual_seed(seed)  # the first tokens and the sampling draw from the one global generator
    for start in range(0, samples, 16):
        first = torch.randint(0, tok.vocab_size, (min(16, samples - start), 1))
        with torch.no_grad():
            ids = model.generate(first, attention_mask=torch.ones_like(first), do_sample=True, top_p=0.95,
                                 temperature=1.0, max_new_tokens=length, min_new_tokens=length,
                                 pad_token_id=tok.eos_token_id)
        for i, row in enumerate(ids):
            (dest / f"sample-{start + i:04d}.txt").write_text(tok.decode(row, skip_special_tokens=True))
        print(f"  sampled {start + len(ids)}/{samples}", flush=True)


SOURCES = {"wiki-tail": wiki_tail, "self": self_generated}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", nargs="*", default=list(SOURCES), choices=list(SOURCES))
    p.add_argument("--samples", type=int, default=80, help="self: sequences sampled")
    p.add_argument("--length", type=int, default=560, help="self: tokens per sequence")
    p.add_argument("--options", default="", help="extra aser-quantize options, one string")
    args = p.parse_args()
    assets = json.loads(subprocess.run([sys.executable, "examples/prepare_assets.py", "--eval-text"], cwd=ROOT,
                                       check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    options = args.options.split()
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    with tempfile.TemporaryDirectory(prefix="calib-sources-") as tmp:
        work = Path(tmp)
        log = work / "log.txt"
        for name in args.sources:
            text = work / f"text-{name}"
            text.mkdir()
            print(f"{name}: preparing calibration text", flush=True)
            SOURCES[name](assets, text, samples=args.samples, length=args.length)
            artifact = work / f"model-{name}"
            start = time.perf_counter()
            subprocess.run(["aser-quantize", assets["model"], str(artifact), "--calib", str(text), "--quiet",
                            *options], cwd=ROOT, check=True)
            seconds = time.perf_counter() - start
            scores = evaluate(artifact, assets["eval"], work, log)
            key = " ".join([name, *options])
            results[key] = {"command": " ".join(["aser-quantize MODEL OUT --calib", f"<{name}>", *options]),
                            "quantize_seconds": round(seconds, 1), "scores": scores}
            print(f"{key}: " + ", ".join(f"{k} {v['ppl']:.2f}" for k, v in scores.items()), flush=True)
            OUT.write_text(json.dumps(results, indent=2) + "\n")
            shutil.rmtree(artifact)
    return 0


if __name__ == "__main__":
    sys.exit(main())
