"""ASER against llm-compressor (vLLM's own quantizer) on the same calibration windows, scored the same way.

Rows: the source model; ASER defaults; ASER without the low-rank branch (rotation + GPTQ, W4A8); plain RTN W4A8;
and llm-compressor 0.14 (own venv `.venv-llmcompressor`, created on first use) W4A8 GPTQ group 128 and per
channel, W4A16 GPTQ group 128, W8A8 SmoothQuant + GPTQ. Every quantizer gets the same token windows (the
project's `token_windows` of the calibration source); every artifact is scored by `aser-eval --backend vllm`,
prompt logprobs through vLLM's CPU build (the activation quantization the engine really runs, theirs and ours),
on held-out code and prose. Quantization wall time and peak RSS come from /usr/bin/time. Results are cached per
row in docs/accuracy/vs_llmcompressor.json and the table is written to docs/accuracy/VS_LLMCOMPRESSOR.md.

    python benchmarks/vs_llmcompressor.py --model qwen2.5-coder-1.5b [--calib code|prose] [--only ROWS] [--windows N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.machine import machine_tag  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "accuracy"
RESULTS = OUT_DIR / "vs_llmcompressor.json"
LLMC_VENV = ROOT / ".venv-llmcompressor"
LLMC_PACKAGES = ["llmcompressor==0.14.0.1", "torch==2.13.0+cpu", "transformers==5.17.0"]
WINDOW = 2048
NUM_SAMPLES, SEQ_LEN = 64, 512  # aser-quantize's defaults, for every quantizer
OURS = {  # row -> aser-quantize options
    "aser": [],
    "aser-head": ["--quantize-head"],  # the output head quantized too (a decode-speed option): its perplexity cost
    "aser-no-lowrank": ["--method", "rtn"],  # rotation + GPTQ + clipped scales, no smoothing, no low-rank branch
    "rtn": ["--method", "rtn", "--base", "rtn", "--clip", "minmax", "--rotate", "none"],
}
THEIRS = ("llmc-w4a8-g128", "llmc-w4a8-channel", "llmc-w4a16-g128", "llmc-w8a8")
# vLLM's CPU build serves compressed-tensors W4A8 through Dynamic4bitLinearKernel, whose 2048-token prefill step ran
# past the engine's 300 s limit (AMD EPYC AVX-512): these rows are scored by compressed-tensors' fake quantization.
TORCH_SCORED = ("llmc-w4a8-g128", "llmc-w4a8-channel")
LABELS = {
    "source": "source model (bf16)",
    "aser": "ASER defaults (W4A8 per channel, rotation, GPTQ, 3% low-rank)",
    "aser-head": "ASER defaults + `--quantize-head` (output head W4A8 too)",
    "aser-no-lowrank": "ASER without the low-rank branch (rotation + GPTQ)",
    "rtn": "RTN W4A8 per channel",
    "llmc-w4a8-g128": "llm-compressor W4A8 GPTQ, int4 group 128",
    "llmc-w4a8-channel": "llm-compressor W4A8 GPTQ, int4 per channel",
    "llmc-w4a16-g128": "llm-compressor W4A16 GPTQ group 128 (weight-only)",
    "llmc-w8a8": "llm-compressor W8A8 SmoothQuant + GPTQ",
}


def ensure_llmc_venv() -> Path:
    python = LLMC_VENV / "bin" / "python"
    stamp = LLMC_VENV / (".installed-" + "-".join(LLMC_PACKAGES).replace("==", "_"))
    if not stamp.exists():
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(LLMC_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *LLMC_PACKAGES], check=True)
        stamp.touch()
    return python


def timed(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run a command under /usr/bin/time: its wall seconds and peak RSS (MiB) of the process."""
    stats = log.with_suffix(".time")
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(["/usr/bin/time", "-o", str(stats), "-f", "%e %M", *cmd], stdout=fh,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}); see {log}")
    wall, rss_kib = stats.read_text().split()[-2:]
    return {"quantize_seconds": float(wall), "peak_rss_mib": round(int(rss_kib) / 1024)}


def calibration_windows(model: Path, calib: str, suffixes: list[str] | None, target: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from vllm_aser_offline.calibrate.calibration import read_texts, token_windows

    tokenizer = AutoTokenizer.from_pretrained(model)
    windows = token_windows(read_texts(calib, suffixes, tokenizer), tokenizer, NUM_SAMPLES, SEQ_LEN, 0)
    target.write_text(json.dumps(windows.tolist()))
    return target


def score(model_dir: Path, texts: dict[str, tuple[str, list[str]]], windows: int, work: Path, log: Path) -> dict:
    scores = {}
    for name, (path, suffixes) in texts.items():
        out = work / f"eval-{name}.json"
        cmd = ["aser-eval", str(model_dir), "--backend", "vllm", "--dtype", "bfloat16", "--text", path,
               "--window", str(WINDOW), "--max-windows", str(windows), "--quiet", "--output", str(out)]
        for suffix in suffixes:
            cmd += ["--text-suffix", suffix]
        with log.open("a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not out.exists():
            scores[name] = {"error": f"aser-eval failed ({proc.returncode}); see {log}"}
            continue
        result = json.loads(out.read_text())
        scores[name] = {"ppl": result["ppl"], "tokens": result["tokens"]}
        out.unlink()
    return scores


def score_llmc_torch(model_dir: Path, model: Path, texts: dict[str, tuple[str, list[str]]], windows: int,
                     work: Path, log: Path, env: dict) -> tuple[dict, dict]:
    """Scores through compressed-tensors' own quantize-dequantize in torch (harness/llmcompressor_scorer.py), on
    the windows `aser-eval` scores: the same token ids, cut by the project's `eval_windows`."""
    from transformers import AutoTokenizer

    from vllm_aser_offline.evaluate.perplexity import eval_windows

    tokenizer = AutoTokenizer.from_pretrained(model)
    files = {}
    for name, (path, suffixes) in texts.items():
        files[name] = work / f"eval-windows-{name}.json"
        ids = eval_windows(path, tokenizer, WINDOW, windows, tuple(suffixes) or None)
        files[name].write_text(json.dumps(ids.tolist()))
    job = work / "score-job.json"
    job.write_text(json.dumps({"model": str(model_dir), "texts": {k: str(v) for k, v in files.items()}}))
    with log.open("a") as fh:
        fh.write(f"\n$ llmcompressor_scorer.py {model_dir}\n")
        fh.flush()
        proc = subprocess.run([str(ensure_llmc_venv()), str(ROOT / "benchmarks" / "harness" / "llmcompressor_scorer.py"),
                               str(job)], stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        return {name: {"error": f"torch scorer failed ({proc.returncode}); see {log}"} for name in texts}, {}
    result = worker_result(log)
    return {name: result[name] for name in texts}, {k: v for k, v in result.items() if k not in texts}


def worker_result(log: Path) -> dict:
    """The last RESULT line the llm-compressor worker printed into the log."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1].removeprefix("RESULT ")) if lines else {}


def label(name: str, row: dict) -> str:
    text = LABELS.get(name, name)
    group = row.get("group")
    text = text.replace("group 128", f"group {group}") if group and "g128" in name else text
    return text + (" †" if row.get("scorer") == "torch" else "")


def machines_line(rows: dict, default: str) -> str:
    """The CPUs the rows ran on: quantize times are only comparable between rows of one CPU."""
    machines = sorted({row.get("machine", default) for row in rows.values()})
    if len(machines) < 2:
        return machines[0] if machines else default
    return "; ".join(f"{machine_tag(m)} = {m}" for m in machines) + " (each row names its CPU kind; perplexity " \
        "does not depend on the CPU, quantize time does)"


def render(results: dict) -> str:
    lines = ["# ASER against llm-compressor", "",
             "Written by `python benchmarks/vs_llmcompressor.py`; do not edit by hand. Same calibration windows "
             f"({NUM_SAMPLES} x {SEQ_LEN} tokens) for every quantizer; perplexity through vLLM's CPU build "
             f"(`aser-eval --backend vllm`, windows of {WINDOW} tokens); lower is better. \"Gap closed\" is the "
             "share of the RTN-to-source perplexity gap removed, on each text.", ""]
    for key, entry in results.items():
        rows = entry["rows"]
        machines = {row.get("machine", entry["machine"]) for row in rows.values()}
        texts = list(next(iter(rows.values()))["scores"]) if rows else []
        lines += [f"## {entry['model']}, calibrated on {entry['calib']}", "",
                  f"Machine: {machines_line(rows, entry['machine'])}; {entry['date']}. "
                  f"Source model: {entry['source_note']}", "",
                  "| row | " + " | ".join(f"{t} ppl | gap closed" for t in texts) + " | quantize time | peak RSS |",
                  "|---|" + "---|---|" * len(texts) + "---|---|"]
        for name, row in rows.items():
            cells = []
            for t in texts:
                s = row["scores"].get(t, {})
                if "ppl" not in s:
                    cells += [s.get("error", "n/a"), ""]
                    continue
                fp, rtn = rows.get("source", {}).get("scores", {}).get(t, {}), rows.get("rtn", {}).get("scores", {}).get(t, {})
                gap = ""
                if "ppl" in fp and "ppl" in rtn and rtn["ppl"] > fp["ppl"] and name not in ("source", "rtn"):
                    gap = f"{(rtn['ppl'] - s['ppl']) / (rtn['ppl'] - fp['ppl']):.0%}"
                cells += [f"{s['ppl']:.3f}", gap]
            time_cell = f"{row['quantize_seconds'] / 60:.1f} min" if "quantize_seconds" in row else ""
            rss_cell = f"{row['peak_rss_mib'] / 1024:.1f} GiB" if "peak_rss_mib" in row else ""
            text = label(name, row) + ("" if len(machines) < 2 else f" ({machine_tag(row['machine'])})")
            lines.append(f"| {text} | " + " | ".join(cells) + f" | {time_cell} | {rss_cell} |")
        lines.append("")
        if any(row.get("scorer") == "torch" for row in rows.values()):
            lines += ["† scored by compressed-tensors' own quantize-dequantize in torch, float32 (int4 weights and "
                      "int8 per-token inputs; checked: switching the input quantization off changes the logits), "
                      "on the same token windows: vLLM's CPU build serves these checkpoints through "
                      "Dynamic4bitLinearKernel, whose 2048-token prefill step ran past the engine's 300 s limit.", ""]
        checks = [(name, row) for name, row in rows.items() if "scores_torch" in row and row.get("scorer") != "torch"]
        for name, row in checks:
            pairs = [f"{t} {row['scores'][t]['ppl']:.3f} vs {row['scores_torch'][t]['ppl']:.3f}" for t in texts
                     if "ppl" in row["scores"].get(t, {}) and "ppl" in row["scores_torch"].get(t, {})]
            if pairs:
                lines += [f"Scorer check, {label(name, row)}: vLLM bf16 against the torch fake-quant scorer: "
                          + "; ".join(pairs) + ".", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", choices=["smollm2", "qwen2.5-coder-1.5b"])
    p.add_argument("--calib", default="code", choices=["code", "prose"],
                   help="code: Python sources of one project (networkx); prose: State of the Union addresses")
    p.add_argument("--only", help="comma-separated rows (default: all)")
    p.add_argument("--windows", type=int, default=8, help="windows of 2048 tokens scored per text")
    p.add_argument("--fresh", action="store_true", help="recompute rows already in the results file")
    p.add_argument("--rescore", action="store_true",
                   help="score cached rows again from their artifacts, keeping their quantize time and memory")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness.machine import describe_machine

    assets = json.loads(subprocess.run([sys.executable, "examples/prepare_assets.py", "--model", args.model,
                                        "--eval-text"], cwd=ROOT, check=True, capture_output=True, text=True).stdout)
    model = Path(assets["model"])
    calib, suffixes = (assets["calib_code"], [".py"]) if args.calib == "code" else (assets["calib"], [])
    texts = {"code": (assets["eval"]["code"], [".py"]), "wikipedia": (assets["eval"]["wikipedia"], [])}
    cache = model.parents[1] / "bench" / f"vs-llmc-{args.model}-{args.calib}"
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / "run.log"
    windows_file = calibration_windows(model, calib, suffixes or None, cache / "calibration-windows.json")

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    key = f"{args.model}/{args.calib}"
    machine = describe_machine()
    entry = results.setdefault(key, {"rows": {}})
    if entry.get("windows") != args.windows:  # scores over other text are not comparable; a row's CPU is its own
        entry["rows"] = {}
    for row in entry["rows"].values():  # rows from before rows named their machine
        row.setdefault("machine", entry.get("machine", machine))
    entry.update(model=args.model, calib=f"{args.calib} ({Path(calib).name})", machine=machine,
                 windows=args.windows, date=time.strftime("%Y-%m-%d"),
                 source_note="dequantized from a 4-bit GGUF (its weights already lie on a 4-bit grid)")
    rows = ["source", *OURS, *THEIRS]
    if args.only:
        rows = [r for r in rows if r in args.only.split(",")]
    for name in rows:
        artifact = cache / name if name != "source" else model
        if name in entry["rows"] and not args.fresh and not (args.rescore and artifact.exists()):
            print(f"{name}: cached", flush=True)
            continue
        print(f"{name}: ...", flush=True)
        record: dict = {"machine": machine}
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "VIRTUAL_ENV")}
        if name in entry["rows"] and args.rescore:
            record = {k: v for k, v in entry["rows"][name].items() if k not in ("scores", "scores_torch", "scorer", "act_quant_check")}
        elif name == "source":
            artifact = model
        elif name in OURS:
            shutil.rmtree(artifact, ignore_errors=True)
            cmd = ["aser-quantize", str(model), str(artifact), "--calib", calib, "--quiet", *OURS[name]]
            for suffix in suffixes:
                cmd += ["--calib-suffix", suffix]
            record |= timed(cmd, log)
        else:
            python = ensure_llmc_venv()
            shutil.rmtree(artifact, ignore_errors=True)
            job = cache / f"{name}.json"
            job.write_text(json.dumps({"model": str(model), "windows": str(windows_file),
                                       "scheme": name.removeprefix("llmc-"), "out": str(artifact)}))
            record |= timed([str(python), str(ROOT / "benchmarks" / "harness" / "llmcompressor_worker.py"), str(job)],
                            log, env)
            record["group"] = worker_result(log)["group"]  # 64 where 128 does not divide the input sizes
        if name in THEIRS:
            record["scores_torch"], record["act_quant_check"] = score_llmc_torch(
                artifact, model, texts, args.windows, cache, log, env)
        if name in TORCH_SCORED:
            record["scorer"], record["scores"] = "torch", record.pop("scores_torch")
        else:
            record["scores"] = score(artifact, texts, args.windows, cache, log)
        print(f"{name}: {json.dumps(record)}", flush=True)
        entry["rows"][name] = record
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    (OUT_DIR / "VS_LLMCOMPRESSOR.md").write_text(render(results))
    print(f"wrote {OUT_DIR / 'VS_LLMCOMPRESSOR.md'}")
    import readme_table

    readme_table.main([])
    return 0


if __name__ == "__main__":
    sys.exit(main())
