"""Throughput of ASER against the in-tree alternatives, measured the same way in the same run (`make bench`).

For each model (SmolLM2-135M-Instruct; optionally a random-weight Llama of ~1B parameters) it prepares, with our
own tools only: the BF16 model, W8A8 int8 and W4A16 int4 checkpoints in compressed-tensors format (served by
vLLM's in-tree support) and the ASER W4A8 model; then runs `vllm bench throughput` (random dataset, fixed seed)
for each at several input/output lengths, and records tokens/s, the ratio to BF16 of the same run, the weight
bytes on disk and the engine start-up time. Writes docs/throughput/{results.json,THROUGHPUT.md,throughput.png}.

    python benchmarks/throughput.py [--models smollm2 llama-1b-random qwen3-moe-random] [--only aser,bf16] [--out DIR]

The random Qwen3-MoE (benchmarks/harness/random_moe.py) runs BF16 and ASER only (and, with --only naming it,
aser-moe-per-expert: the same ASER artifact with each expert run as its own call).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "throughput"
# (input tokens, output tokens, prompts[, max concurrent sequences]): decode-heavy and prefill-heavy batches, and
# one request at a time (M = 1 per linear at decode: the weights' bytes decide, as for a single user)
WORKLOADS = [(128, 128, 64), (1024, 16, 32)]
SINGLE_STREAM = (128, 128, 4, 1)
WORKLOAD_SETS = {"batch": WORKLOADS, "single": [SINGLE_STREAM], "decode": [WORKLOADS[0], SINGLE_STREAM],
                 "all": [*WORKLOADS, SINGLE_STREAM]}
# Speed does not depend on calibration quality: the baselines are plain RTN on a short calibration run.
FAST_RTN = ["--method", "rtn", "--base", "rtn", "--clip", "minmax", "--num-samples", "8"]
METHODS = {  # name -> aser-quantize options (None: the unquantized model itself)
    "bf16": None,
    "w8a8": [*FAST_RTN, "--w-bits", "8", "--a-bits", "8", "--export", "compressed-tensors"],
    "w4a16": [*FAST_RTN, "--w-bits", "4", "--a-bits", "16", "--export", "compressed-tensors"],
    "aser": [],  # the defaults: ASER W4A8, 3% low-rank budget (SmolLM2: the quickstart's artifact when present)
    # the defaults plus down_proj's input rotated online (the cost of the runtime Hadamard, against `aser`)
    "aser-mlp-hadamard": ["--mlp-hadamard", "auto"],
    # the defaults plus the head quantized (`--quantize-head`): the head's share of a decode step
    "aser-head": ["--quantize-head"],
    # the `aser` artifact with each MoE expert its own native call (VLLM_ASER_MOE_PER_EXPERT=1), against the
    # default one grouped call per layer
    "aser-moe-per-expert": "aser",
}
ABLATIONS = ("aser-mlp-hadamard", "aser-head", "aser-moe-per-expert")  # run only when --only names them
# vLLM's CPU build has no compressed-tensors int8/int4 MoE method: the MoE model compares ASER with BF16 only
MODEL_METHODS = {"qwen3-moe-random": ("bf16", "aser", "aser-moe-per-expert")}
# vLLM's CPU build serves compressed-tensors int4 in BF16 through an AMX int4 x int8 kernel when the CPU has AMX
# (VLLM_CPU_INT4_W4A8=1, its default); that kernel needs input sizes that are multiples of 128 and fails to load
# SmolLM2 (hidden size 576). There the W4A16 row runs vLLM's weight-only int4 kernel instead.
METHOD_ENV = {("smollm2", "w4a16"): {"VLLM_CPU_INT4_W4A8": "0"},
              ("qwen3-moe-random", "aser-moe-per-expert"): {"VLLM_ASER_MOE_PER_EXPERT": "1"}}


def sh(cmd: list[str], log: Path, env: dict | None = None, timeout: int = 7200) -> str:
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    with log.open("a") as fh:
        fh.write(proc.stdout[-20000:] + proc.stderr[-20000:])
    if proc.returncode:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def weight_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def prepare(model: str, assets: dict, cache: Path, log: Path, methods: list[str]) -> dict[str, Path]:
    """Model directories of the asked methods, quantized once and cached."""
    if model in ("smollm2", "qwen2.5-coder-1.5b"):  # real models (examples/prepare_assets.py)
        source, calib, extra = Path(assets["model"]), assets["calib"], []
    else:
        from harness.random_llama import build_random_llama, write_random_text  # benchmarks/ is on sys.path
        from harness.random_moe import build_random_qwen3_moe

        source = (build_random_llama(cache / "llama-1b-random", Path(assets["model"])) if model == "llama-1b-random"
                  else build_random_qwen3_moe(cache / "qwen3-moe-random", Path(assets["model"])))
        calib = str(write_random_text(cache / "random-text.txt", source))
        # random weights: the values do not matter here, only the ranks; the RTN base because GPTQ with clipped
        # scales ran past 35 minutes on this 2-core machine for the 1B model without finishing
        extra = ["--num-samples", "8", "--seq-len", "256", "--base", "rtn", "--clip", "minmax"]
    dirs = {}
    for method, options in METHODS.items():
        if method not in MODEL_METHODS.get(model, METHODS) or method not in methods:
            continue
        if options is None:
            dirs[method] = source
            continue
        if isinstance(options, str):  # another method's artifact, served differently (METHOD_ENV)
            options, method_dir = METHODS[options], options
        else:
            method_dir = method
        out = cache / f"{model}-{method_dir}"
        quickstart = source.parent / f"{source.name}-aser"
        if method_dir == "aser" and model == "smollm2" and (quickstart / "config.json").exists():
            out = quickstart
        if not (out / "config.json").exists():
            print(f"  quantizing {model} -> {method}", flush=True)
            sh(["aser-quantize", str(source), str(out), "--calib", calib, "--quiet", *extra, *options], log)
        dirs[method] = out
    return dirs


def bench(model_dir: Path, method: str, workload: tuple[int, int, int], log: Path, work: Path,
          env: dict[str, str] | None = None) -> dict:
    inp, out, prompts, *concurrency = workload
    result_file = work / f"tp-{method}-{inp}-{out}.json"
    cmd = ["vllm", "bench", "throughput", "--model", str(model_dir), "--dtype", "bfloat16",
           "--dataset-name", "random", "--random-input-len", str(inp), "--random-output-len", str(out),
           "--num-prompts", str(prompts), "--seed", "0", "--max-model-len", str(inp + out + 16),
           "--output-json", str(result_file)]
    if concurrency:
        cmd += ["--max-num-seqs", str(concurrency[0])]
    start = time.perf_counter()
    text = sh(cmd, log, env={**os.environ, **env} if env else None)
    wall = time.perf_counter() - start
    data = json.loads(result_file.read_text())
    elapsed = data["elapsed_time"]
    loaded = re.search(r"Model loading took ([\d.]+) GiB", text)
    return {
        "tokens_per_s": data["tokens_per_second"], "output_tokens_per_s": prompts * out / elapsed,
        "requests_per_s": data["requests_per_second"], "elapsed_s": elapsed,
        "startup_s": wall - elapsed, "model_memory_gib": float(loaded.group(1)) if loaded else None,
        "kernel": "aser:" + m.group(1) if (m := re.search(r"ASER kernel: (\w+)", text)) else None,
        "env": env or {},
    }


def workload_name(workload: tuple) -> str:
    name = f"{workload[0]}/{workload[1]}x{workload[2]}"
    return name + (" one at a time" if len(workload) > 3 and workload[3] == 1 else "")


def render(results: dict) -> str:
    lines = ["# Throughput: ASER against the in-tree methods in vLLM", "",
             "Written by `make bench` (`python benchmarks/throughput.py`); do not edit by hand. `vllm bench "
             "throughput`, random dataset, seed 0, `--dtype bfloat16`, default scheduler settings; each row is one "
             "engine (start-up = wall time of the command minus generation time). Ratios are to BF16 in the same "
             "run. Weight bytes: the model's safetensors files on disk (embeddings included).", "",
             f"vLLM {results.get('_vllm', '?')}.", ""]
    for model, per_model in results.items():
        if model.startswith("_") or not per_model["runs"]:
            continue
        lines += [f"## {model}", "", f"Machine: {per_model.get('machine', 'not recorded')}.", "",
                  "| method | weight bytes | workload (in/out × prompts) | tokens/s | output tokens/s | × BF16 | "
                  "start-up |", "|---|---|---|---|---|---|---|"]
        for key, row in per_model["runs"].items():
            method, workload = key.split("@")
            base = per_model["runs"].get(f"bf16@{workload}")
            ratio = f"{row['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else ""
            lines.append(f"| {method} | {per_model['weight_bytes'][method] / 2**20:.0f} MiB | {workload} | "
                         f"{row['tokens_per_s']:.1f} | {row['output_tokens_per_s']:.1f} | {ratio} | "
                         f"{row['startup_s']:.0f} s |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in results if not m.startswith("_") and results[m]["runs"]]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), dpi=120, squeeze=False)
    for ax, model in zip(axes[0], models):
        runs = results[model]["runs"]
        workloads = sorted({k.split("@")[1] for k in runs})
        methods = [m for m in METHODS if any(k.startswith(m + "@") for k in runs)]
        width = 0.8 / max(len(methods), 1)
        top = 1.0
        for i, method in enumerate(methods):
            ratios = [runs[f"{method}@{w}"]["tokens_per_s"] / runs[f"bf16@{w}"]["tokens_per_s"]
                      if f"{method}@{w}" in runs and f"bf16@{w}" in runs else 0 for w in workloads]
            top = max(top, *ratios)
            ax.bar([j + i * width for j in range(len(workloads))], ratios, width, label=method)
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(workloads))], workloads)
        ax.set_ylabel("tokens/s relative to BF16")
        ax.set_ylim(0, top * 1.3)  # room for the legend above the bars
        ax.set_title(f"{model}\n{results[model].get('machine', '')}", fontsize=9)
        ax.legend(loc="upper center", ncol=len(methods), fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["smollm2"], choices=["smollm2", "llama-1b-random", "qwen3-moe-random"])
    p.add_argument("--only", help="comma-separated methods (default: all of " + ", ".join(METHODS) + ")")
    p.add_argument("--out", default=str(OUT_DIR),
                   help="where results.json, THROUGHPUT.md and the plot go (rows are merged into results.json)")
    p.add_argument("--workloads", choices=list(WORKLOAD_SETS), default="batch",
                   help="batch: 128/128 x 64 and 1024/16 x 32; single: 128/128 x 4 one request at a time; decode: "
                        "128/128 x 64 and single; all")
    args = p.parse_args(argv)
    methods = args.only.split(",") if args.only else [m for m in METHODS if m not in ABLATIONS]
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    assets = json.loads(subprocess.run([sys.executable, "examples/prepare_assets.py"], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout)
    cache = Path(assets["model"]).parents[1] / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "throughput.log"
    out_dir = Path(args.out)
    results_file = out_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    import vllm

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness.machine import describe_machine

    results.pop("_machine", None)  # per model since the machine can differ between sessions
    machine = describe_machine()
    results["_vllm"] = vllm.__version__
    out_dir.mkdir(parents=True, exist_ok=True)
    for model in args.models:
        dirs = prepare(model, assets, cache, log, methods)
        entry = results.setdefault(model, {"runs": {}, "weight_bytes": {}})
        if entry.get("machine") != machine:  # rows from another CPU are not comparable: start afresh
            entry.update(runs={}, weight_bytes={}, machine=machine)
        for method in [m for m in methods if m in dirs]:
            entry["weight_bytes"][method] = weight_bytes(dirs[method])
            for workload in WORKLOAD_SETS[args.workloads]:
                key = f"{method}@{workload_name(workload)}"
                print(f"{model} {key}", flush=True)
                entry["runs"][key] = bench(dirs[method], method, workload, log, cache,
                                           METHOD_ENV.get((model, method)))
                print(f"  {entry['runs'][key]['tokens_per_s']:.1f} tokens/s", flush=True)
                results_file.write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "THROUGHPUT.md").write_text(render(results))
    plot(results, out_dir)
    print(f"wrote {out_dir / 'THROUGHPUT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
