"""One-shot GPU measurement run: what the CUDA path must show (kernels, end to end, throughput), in stages that
fit a short GPU session.

Runs on the device machine (vLLM carried there by benchmarks/gpu_carry/, see docs/CUDA.md) and, with `--tiny`, on
any machine with vLLM (the CPU rehearsal: same code paths, small shapes). Stages, in order of value; each is
skipped with a note when the deadline is too close, and results are written after every step so that a run cut
short still leaves its figures:

  facts       GPU, driver, torch / vLLM / Triton / transformers versions
  tests       the GPU tests: Marlin W4A8 path against the reference kernel (compiled), --device cuda quantization
  kernels     benchmarks/gpu_kernels.py on Llama-3-8B's linears: FP16, vLLM's CUTLASS W8A8 and Marlin W4A8, ASER on
              Marlin (and ASER's own Triton GEMM with --with-triton)
  engine      a tiny Llama (Marlin-sized) quantized on the GPU, served by vLLM with the plugin: perplexity through
              vLLM against the torch reference, and which ASER kernel path vLLM took
  quantize    `aser-quantize --device cuda` on a random-weight Llama-3-8B-shaped model (--layers of its 32), timed
  throughput  `vllm bench throughput` on that model: BF16, W8A8 (CUTLASS), W4A16 (Marlin), vLLM's own W4A8 (Marlin
              with int8 activations on the W4A16 checkpoint) and ASER, figures from the same run

    python benchmarks/gpu_e2e.py --out $OUT --deadline-s 420                 # on the GPU machine
    python benchmarks/gpu_e2e.py --tiny --out /tmp/e2e --stages engine,quantize,throughput   # CPU rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness.random_llama import save_random_model, write_random_text  # noqa: E402
from throughput import METHODS as QUANTIZE_OPTIONS  # noqa: E402

STAGES = ("facts", "tests", "kernels", "engine", "quantize", "throughput")
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, tie_word_embeddings=False)  # every linear a multiple of Marlin's tiles
# (input, output, prompts, max concurrent sequences or None): a batch that fills the GPU, and one user
GPU_WORKLOADS = [(1024, 128, 256, None), (128, 128, 8, 1)]
TINY_WORKLOADS = [(64, 16, 8, None)]
# method -> (checkpoint it serves, extra environment)
SERVED = {
    "bf16": ("bf16", {}),
    "w8a8": ("w8a8", {}),
    "w4a16": ("w4a16", {}),
    "w4a8-marlin": ("w4a16", {"VLLM_MARLIN_INPUT_DTYPE": "int8"}),  # vLLM's own W4A8 (PR 24722)
    "aser": ("aser", {}),
}
# W4A16 as deployed (GPTQ/AWQ checkpoints: groups of 128); vLLM's own W4A8 Marlin path also needs groups (0.26
# multiplies the activation scales by a global scale that per-channel checkpoints do not have)
EXTRA_OPTIONS = {"w4a16": ["--group-size", "128"]}
# rough stage costs (s) on an H100/H200, to skip what cannot finish before the deadline
STAGE_COST = {"facts": 5, "tests": 90, "kernels": 150, "engine": 120, "quantize": 120, "throughput": 120}


class Run:
    """The output folder, the deadline and a log per command."""

    def __init__(self, out: Path, deadline_s: float, python: str):
        self.out, self.python = out, python
        self.deadline = time.monotonic() + deadline_s
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.results_file = out / "results.json"
        self.results = json.loads(self.results_file.read_text()) if self.results_file.exists() else {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.results_file.write_text(json.dumps(self.results, indent=2) + "\n")

    def cmd(self, name: str, args: list[str], timeout: float | None = None, env: dict | None = None) -> tuple[int, str, float]:
        """Runs a command with at most the time left; its output goes to logs/NAME.log (last 200 kB)."""
        limit = max(5.0, min(timeout or 1e9, self.left()))
        start = time.perf_counter()
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=limit, cwd=ROOT,
                                  env={**os.environ, **(env or {})})
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc = 124
            text = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
            text += ((e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))
            text += f"\n[timed out after {limit:.0f} s]"
        seconds = time.perf_counter() - start
        (self.out / "logs" / f"{name}.log").write_text("$ " + " ".join(args) + f"\n[rc {rc}, {seconds:.1f} s]\n"
                                                       + text[-200_000:])
        return rc, text, seconds

    def module(self, name: str, module: str, *args: str, **kwargs) -> tuple[int, str, float]:
        return self.cmd(name, [self.python, "-m", module, *args], **kwargs)


def stage_facts(run: Run, opts) -> dict:
    facts = {"python": platform.python_version(), "machine": platform.machine()}
    for module in ("torch", "vllm", "triton", "transformers", "compressed_tensors"):
        rc, text, _ = run.cmd(f"version-{module}", [run.python, "-c", f"import {module}; print({module}.__version__)"],
                              timeout=120)
        facts[module] = text.strip().splitlines()[-1] if rc == 0 and text.strip() else f"unavailable (rc {rc})"
    rc, text, _ = run.cmd("nvidia-smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                         "--format=csv,noheader"], timeout=30) if _has("nvidia-smi") else (1, "", 0)
    facts["gpu"] = text.strip() if rc == 0 else "none"
    return facts


def _has(program: str) -> bool:
    return any((Path(d) / program).exists() for d in os.environ.get("PATH", "").split(os.pathsep))


def stage_tests(run: Run, opts) -> dict:
    out = {}
    for name, args in {
        "marlin_and_gpu_quantizer": ["tests/test_marlin_w4a8.py", "tests/test_quantizer.py", "-k", "marlin or gpu"],
        "triton_marlin_path": ["tests/test_triton_kernels.py", "-k", "marlin or lowrank_up or glue"],
    }.items():
        env = {"TRITON_INTERPRET": "1"} if name.startswith("triton") and opts.device == "cpu" else None
        rc, text, seconds = run.module(f"pytest-{name}", "pytest", "-q", "-p", "no:cacheprovider", *args,
                                       timeout=240, env=env)
        summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|errors?|skipped)", line)]
        out[name] = {"rc": rc, "summary": (summary or text.strip().splitlines() or [""])[-1], "s": round(seconds)}
    return out


def stage_kernels(run: Run, opts) -> dict:
    methods = ["fp16", "w8a8_cutlass", "marlin_w4a8", "aser_marlin"] + (["w8a8", "w4a8", "aser"] if opts.with_triton else [])
    args = ["--out", str(run.out / "kernels")]
    if opts.tiny:  # whatever this machine has, interpreted
        args += ["--smoke"]
    else:
        args += ["--vllm", "on", "--methods", *methods, "--models", "llama3-8b", "--ms", "1", "16", "64", "256",
                 "1024", "4096"]
    env = {"TRITON_INTERPRET": "1"} if opts.tiny else None
    rc, text, seconds = run.cmd("kernels", [run.python, "benchmarks/gpu_kernels.py", *args], timeout=300, env=env)
    table = [line for line in text.splitlines() if line.startswith(("llama3", "smoke", "model"))]
    return {"rc": rc, "s": round(seconds), "table": table}


def build_model(path: Path, tokenizer: Path, config: dict, layers: int, device: str) -> Path:
    """A Llama with random bf16 weights (built on `device`: an 8B model is fast to initialize there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(tok):
        cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          num_hidden_layers=layers, **config)
        with torch.device(device):
            return LlamaForCausalLM(cfg).to(torch.bfloat16)

    model = save_random_model(path, tokenizer, make)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return model


def quantize(run: Run, name: str, source: Path, target: Path, calib: Path, options: list[str], device: str) -> dict:
    if (target / "config.json").exists():
        return {"rc": 0, "s": None, "cached": True}
    rc, text, seconds = run.module(f"quantize-{name}", "vllm_aser_offline", str(source), str(target), "--calib", str(calib),
                                   "--device", device, "--overwrite", *options, timeout=900)
    return {"rc": rc, "s": round(seconds, 1), "tail": text.strip().splitlines()[-3:]}


def stage_engine(run: Run, opts) -> dict:
    work = opts.work / "engine"
    source = build_model(work / "tiny-llama", opts.tokenizer, TINY, 2, opts.device)
    calib = write_random_text(work / "calib.txt", source, words=20000)
    target = work / "tiny-llama-aser"
    result = {"quantize": quantize(run, "tiny-aser", source, target, calib, ["--num-samples", "8", "--seq-len", "128"],
                                   opts.device)}
    if result["quantize"]["rc"]:
        return result
    for backend, dtype in (("reference", "float32"), ("vllm", "bfloat16"), ("vllm", "float16")):
        report = work / f"eval-{backend}-{dtype}.json"
        rc, text, seconds = run.module(f"eval-{backend}-{dtype}", "vllm_aser_offline.evaluate.eval_cli", str(target), "--text",
                                       str(calib), "--window", "256", "--max-windows", "8", "--backend", backend,
                                       "--dtype", dtype, "--output", str(report), timeout=400)
        entry = {"rc": rc, "s": round(seconds, 1)}
        if rc == 0 and report.exists():
            entry["perplexity"] = json.loads(report.read_text()).get("ppl")
        paths = sorted(set(re.findall(r"ASER (\w+) kernel: (\w+) path", text)))
        entry["kernel_paths"] = [f"{k}:{p}" for k, p in paths]
        result[f"{backend}-{dtype}"] = entry
    ref = result.get("reference-float32", {}).get("perplexity")
    for key in ("vllm-bfloat16", "vllm-float16"):
        if ref and (ppl := result.get(key, {}).get("perplexity")):
            result[key]["rel_diff_vs_reference"] = round(ppl / ref - 1, 6)
    return result


def model_paths(opts) -> dict[str, Path]:
    base = opts.work / f"llama3-8b-shape-{opts.layers}l"
    return {"bf16": base, **{m: base.with_name(base.name + f"-{m}") for m in ("w8a8", "w4a16", "aser")}}


def stage_quantize(run: Run, opts) -> dict:
    paths = model_paths(opts)
    start = time.perf_counter()
    config = TINY if opts.tiny else LLAMA3_8B
    build_model(paths["bf16"], opts.tokenizer, config, opts.layers, opts.device)
    result = {"build_s": round(time.perf_counter() - start, 1), "layers": opts.layers, "config": config}
    calib = write_random_text(opts.work / "random-text.txt", paths["bf16"])
    calib_options = ["--num-samples", "8", "--seq-len", "128"] if opts.tiny else []  # ASER: the defaults on a GPU
    result["aser"] = quantize(run, "aser", paths["bf16"], paths["aser"], calib, calib_options, opts.device)
    for method in ("w8a8", "w4a16"):
        result[method] = quantize(run, method, paths["bf16"], paths[method], calib,
                                  QUANTIZE_OPTIONS[method] + EXTRA_OPTIONS.get(method, []), opts.device)
    report = paths["aser"] / "aser_report.json"
    if report.exists():
        data = json.loads(report.read_text())
        result["aser"]["device"] = data.get("provenance", {}).get("device")
        result["aser"]["totals"] = {key: data["totals"].get(key) for key in
                                    ("quantize_seconds", "peak_rss_mib", "peak_cuda_mib", "extra_params_percent")}
    return result


def stage_throughput(run: Run, opts) -> dict:
    paths = model_paths(opts)
    workloads = TINY_WORKLOADS if opts.tiny else GPU_WORKLOADS
    result = run.results.get("throughput", {})
    for inp, out, prompts, concurrency in workloads:
        for method in opts.methods:
            checkpoint, env = SERVED[method]
            key = f"{method}@{inp}/{out}x{prompts}" + (f" max {concurrency}" if concurrency else "")
            if key in result and result[key].get("rc") == 0:
                continue
            if run.left() < 60:
                result[key] = {"skipped": f"{run.left():.0f} s left"}
                continue
            if not (paths[checkpoint] / "config.json").exists():
                result[key] = {"skipped": f"no {checkpoint} checkpoint (stage quantize)"}
                continue
            report = opts.work / f"tp-{method}-{inp}-{out}.json"
            args = ["bench", "throughput", "--model", str(paths[checkpoint]), "--dtype", "bfloat16",
                    "--dataset-name", "random", "--random-input-len", str(inp), "--random-output-len", str(out),
                    "--num-prompts", str(prompts), "--seed", "0", "--max-model-len", str(inp + out + 16),
                    "--output-json", str(report)]
            if concurrency:
                args += ["--max-num-seqs", str(concurrency)]
            rc, text, seconds = run.module(f"throughput-{method}-{inp}-{out}", "vllm.entrypoints.cli.main", *args,
                                           timeout=420, env=env)
            entry = {"rc": rc, "wall_s": round(seconds, 1), "env": env}
            if rc == 0 and report.exists():
                data = json.loads(report.read_text())
                entry |= {"tokens_per_s": round(data["tokens_per_second"], 1),
                          "output_tokens_per_s": round(prompts * out / data["elapsed_time"], 1),
                          "elapsed_s": round(data["elapsed_time"], 2)}
            else:
                entry["error"] = text.strip().splitlines()[-5:]
            entry["kernel_paths"] = sorted(set(re.findall(r"ASER \w+ kernel: \w+ path[^\n]*", text)))
            result[key] = entry
            run.results["throughput"] = result
            run.save()
    for key, entry in result.items():  # ratios within this run, per workload
        method, workload = key.split("@", 1)
        base = result.get(f"bf16@{workload}", {}).get("tokens_per_s")
        if base and entry.get("tokens_per_s"):
            entry["vs_bf16"] = round(entry["tokens_per_s"] / base, 3)
        w8a8 = result.get(f"w8a8@{workload}", {}).get("tokens_per_s")
        if w8a8 and entry.get("tokens_per_s"):
            entry["vs_w8a8"] = round(entry["tokens_per_s"] / w8a8, 3)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results.json, logs/ and kernels/ go here")
    p.add_argument("--work", type=Path, default=Path("/tmp/aser-e2e"), help="models and checkpoints")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ", ".join(STAGES))
    p.add_argument("--deadline-s", type=float, default=480, help="stop starting work after this many seconds")
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the 8B-shaped model (Llama-3-8B: 32)")
    p.add_argument("--methods", nargs="*", default=["aser", "bf16", "w4a16", "w8a8", "w4a8-marlin"],
                   choices=list(SERVED), help="throughput rows, in the order they run")
    p.add_argument("--tokenizer", type=Path, default=ROOT / ".carry" / "tokenizer",
                   help="tokenizer folder for the random models (the device machine has no model hub)")
    p.add_argument("--tiny", action="store_true", help="CPU rehearsal: tiny shapes everywhere, any device")
    p.add_argument("--with-triton", action="store_true", help="kernels: also time ASER's own Triton GEMM rows")
    opts = p.parse_args(argv)
    stages = [s for s in opts.stages.split(",") if s]
    if unknown := [s for s in stages if s not in STAGES]:
        p.error(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(STAGES)}")
    import torch

    opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    if opts.tiny:
        opts.layers = min(opts.layers, 2)
    if not (opts.tokenizer / "tokenizer_config.json").exists():
        p.error(f"--tokenizer {opts.tokenizer}: no tokenizer there (benchmarks/gpu_carry/pack.sh copies SmolLM2's)")
    opts.out.mkdir(parents=True, exist_ok=True)
    opts.work.mkdir(parents=True, exist_ok=True)
    run = Run(opts.out, opts.deadline_s, sys.executable)
    run.results.setdefault("run", {}).update(device=opts.device, tiny=opts.tiny, layers=opts.layers,
                                             started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    for stage in stages:
        if run.left() < STAGE_COST[stage] * (0.2 if opts.tiny else 1):
            run.results[stage] = {"skipped": f"{run.left():.0f} s left, stage needs about {STAGE_COST[stage]} s"}
            print(f"[{stage}] skipped: {run.results[stage]['skipped']}", flush=True)
            run.save()
            continue
        print(f"[{stage}] {run.left():.0f} s left", flush=True)
        start = time.perf_counter()
        try:
            run.results[stage] = globals()[f"stage_{stage}"](run, opts)
        except Exception as e:  # keep going: the other stages' figures are worth having
            run.results[stage] = {"error": f"{type(e).__name__}: {e}"}
        run.results[stage + "_s"] = round(time.perf_counter() - start, 1)
        run.save()
        print(json.dumps(run.results[stage], indent=1)[:3000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
