"""`aser-eval`: perplexity of a model directory (unquantized or ASER) on held-out text."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from vllm_aser_offline.calibrate.calibration import CalibrationError
from vllm_aser.format import FormatError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aser-eval",
        description="Perplexity of a Hugging Face or ASER model directory on held-out text, in non-overlapping "
        "windows. Backends: 'reference' (the torch simulation of exactly the math the vLLM kernels run) and "
        "'vllm' (prompt logprobs through vLLM and the aser plugin).",
    )
    p.add_argument("model_dir", type=Path, help="model directory (written by aser-quantize, or unquantized)")
    p.add_argument("--text", type=Path, required=True, help=".txt / .jsonl file or a folder of them")
    p.add_argument("--text-suffix", action="append", default=None, metavar="SUFFIX",
                   help="in a --text folder, score the files ending in SUFFIX (repeatable, e.g. .py; "
                   "default: .txt and .jsonl)")
    p.add_argument("--window", type=int, default=2048, help="tokens per window (default: 2048)")
    p.add_argument("--max-windows", type=int, help="score only the first N windows (default: all)")
    p.add_argument("--backend", choices=("reference", "vllm"), default="reference")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="compute dtype (default: float32)")
    p.add_argument("--enforce-eager", action="store_true", help="vllm backend: skip torch.compile (faster start)")
    p.add_argument("--lowrank-rank", type=int, metavar="R",
                   help="reference backend: truncate every low-rank branch to its first R components (the factors "
                   "are ordered by singular value, so one high-rank artifact gives a rank sweep)")
    p.add_argument("--output", type=Path, help="also write the result JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_windows is not None and args.max_windows < 1:
        print("aser-eval: error: --max-windows must be at least 1", file=sys.stderr)
        return 2
    if args.lowrank_rank is not None and (args.backend != "reference" or args.lowrank_rank < 0):
        print("aser-eval: error: --lowrank-rank needs the reference backend and a rank >= 0", file=sys.stderr)
        return 2
    try:
        if args.backend == "vllm":
            from vllm_aser_offline.evaluate.perplexity_vllm import vllm_perplexity

            result = vllm_perplexity(args.model_dir, args.text, args.window, args.max_windows, args.dtype,
                                     args.enforce_eager, not args.quiet, args.text_suffix)
        else:
            from vllm_aser_offline.evaluate.perplexity import torch_perplexity

            result = torch_perplexity(args.model_dir, args.text, args.window, args.max_windows,
                                      DTYPES[args.dtype], progress=not args.quiet,
                                      lowrank_rank=args.lowrank_rank, suffixes=args.text_suffix)
    except (CalibrationError, FormatError, ValueError, OSError) as exc:
        print(f"aser-eval: error: {exc}", file=sys.stderr)
        return 2
    payload = json.dumps(result.to_json(), indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(payload + "\n")
    print(payload, flush=True)
    if args.backend == "vllm":
        # vLLM's CPU build sometimes aborts in a C++ destructor at interpreter exit ("terminate called without an
        # active exception") after the engine has been shut down: the result is written, so leave without it.
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
