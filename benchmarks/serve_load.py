"""Serving under load: `vllm serve` a model on loopback, drive it with `vllm bench serve` at several
concurrencies (bounded request counts), record failures, TTFT / TPOT percentiles and throughput; ASER, then BF16.

    python benchmarks/serve_load.py [--concurrency 1 8 32] [--prompts-per-level 2]

Writes docs/throughput/serve_load.json and a table in docs/throughput/SERVE_LOAD.md.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "throughput"
INPUT_LEN, OUTPUT_LEN = 256, 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout: float = 900) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(2)
    raise TimeoutError(f"vllm serve not healthy after {timeout} s; see {log}")


def load_test(model_dir: Path, name: str, levels: list[int], per_level: int, work: Path) -> dict:
    port = free_port()
    log = work / f"serve-{name}.log"
    cmd = ["vllm", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
           "--max-model-len", "2048", "--served-model-name", name]
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    result: dict = {"model": str(model_dir), "levels": {}}
    try:
        result["startup_s"] = round(wait_healthy(port, proc, log), 1)
        for concurrency in levels:
            prompts = max(concurrency * per_level, 4)
            out = work / f"load-{name}-c{concurrency}.json"
            bench = ["vllm", "bench", "serve", "--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}",
                     "--model", name, "--tokenizer", str(model_dir), "--dataset-name", "random",
                     "--random-input-len", str(INPUT_LEN), "--random-output-len", str(OUTPUT_LEN), "--ignore-eos",
                     "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--seed", "0",
                     "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,90,99",
                     "--save-result", "--result-dir", str(work), "--result-filename", out.name, "--disable-tqdm"]
            print(f"  {name}: concurrency {concurrency}, {prompts} requests", flush=True)
            proc_b = subprocess.run(bench, capture_output=True, text=True, cwd=ROOT, timeout=3600)
            (work / f"load-{name}-c{concurrency}.log").write_text(proc_b.stdout + proc_b.stderr)
            if proc_b.returncode:
                raise RuntimeError(f"vllm bench serve failed; see {work / f'load-{name}-c{concurrency}.log'}")
            data = json.loads(out.read_text())
            result["levels"][str(concurrency)] = {
                k: data.get(k) for k in ("completed", "failed", "request_throughput", "output_throughput",
                                         "mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms",
                                         "p50_tpot_ms", "p99_tpot_ms", "p99_e2el_ms", "duration")
            } | {"requests": prompts}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return result


def render(results: dict) -> str:
    lines = ["# Serving under load", "",
             "Written by `python benchmarks/serve_load.py`; do not edit by hand. `vllm serve` on loopback "
             f"(`--dtype bfloat16`), `vllm bench serve` random dataset, {INPUT_LEN} input / {OUTPUT_LEN} output "
             "tokens (`--ignore-eos`), seed 0, all requests sent at once up to the concurrency limit.", "",
             f"Machine: {results.get('_machine', 'unknown')}.", "",
             "| model | concurrency | requests | failed | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) |",
             "|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        if name.startswith("_"):
            continue
        for level, r in res["levels"].items():
            lines.append(f"| {name} | {level} | {r['requests']} | {r['failed']} | {r['output_throughput']:.1f} | "
                         f"{r['p50_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} | "
                         f"{r['p50_tpot_ms']:.0f} / {r['p99_tpot_ms']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--prompts-per-level", type=int, default=2, help="requests = concurrency x this (min 4)")
    args = p.parse_args(argv)
    assets = json.loads(subprocess.run([sys.executable, "examples/prepare_assets.py"], cwd=ROOT, check=True,
                                       capture_output=True, text=True).stdout)
    source = Path(assets["model"])
    aser = source.parent / "SmolLM2-135M-Instruct-aser"
    if not (aser / "config.json").exists():
        subprocess.run(["aser-quantize", str(source), str(aser), "--calib", assets["calib"], "--quiet"], check=True)
    work = source.parents[1] / "bench"
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness.machine import describe_machine

    results = {"_machine": describe_machine()}
    for name, model_dir in (("aser", aser), ("bf16", source)):
        results[name] = load_test(model_dir, name, args.concurrency, args.prompts_per_level, work)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "serve_load.json").write_text(json.dumps(results, indent=2) + "\n")
    (OUT_DIR / "SERVE_LOAD.md").write_text(render(results))
    failed = sum(r["failed"] or 0 for n, res in results.items() if not n.startswith("_")
                 for r in res["levels"].values())
    print(render(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
