"""The ASER ablation table on SmolLM2-135M-Instruct: quantize every row with `aser-quantize`, score it with
`aser-eval` on two held-out sources, and write docs/accuracy/{results.json,TABLE.md,rank_curve.png}.

Rows are cached in results.json by their exact command: a re-run only computes rows that are missing or whose
command changed (`--fresh` recomputes all). `make eval` runs it on the CPU machine; see docs/ACCURACY.md.

    python benchmarks/accuracy_table.py [--only REGEX] [--fresh] [--list] [--no-curve]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "docs" / "accuracy"
RESULTS = OUT_DIR / "results.json"
EVAL_SETS = {"wikipedia": 16, "bbc": 8}  # held-out source -> windows of 2048 tokens scored
WINDOW = 2048
CURVE_RANKS = (8, 16, 24, 32, 48, 64)
CURVE_WINDOWS = 8  # Wikipedia windows per curve point


@dataclass(frozen=True)
class Row:
    id: str
    section: str
    label: str
    args: tuple[str, ...] = ()  # aser-quantize options; None-like empty for the source model itself
    quantized: bool = True
    keep: bool = False  # keep the artifact (the rank-vs-perplexity curve truncates it)
    curve: str = ""  # the curve's name for a kept artifact (default: its --method)
    baseline: str = "w4a8-rtn"  # "gap closed" is measured from this row's perplexity


# The base-quantizer and tuning rows keep the setting they were measured in (before rotation and the
# full-precision fit target existed), so that each row changes one thing against its neighbours.
UNROTATED = ("--rotate", "none")
# The method ablation compares methods on the plain round-to-nearest base, as the paper does, whatever the
# shipped defaults are; the base-quantizer section and the defaults row show what a better base adds.
PLAIN = ("--base", "rtn", "--clip", "minmax", *UNROTATED)


def _lowrank_rows(section: str, prefix: str) -> list[Row]:
    rows = []
    for method in ("lorc", "er", "aser"):
        for budget in ("1", "2", "3"):
            rows.append(Row(f"{prefix}-{method}-b{budget}", section, f"`{method}` budget {budget}%",
                            ("--method", method, "--rank-budget", budget, *PLAIN)))
        for rank in ("16", "64"):
            rows.append(Row(f"{prefix}-{method}-r{rank}", section, f"`{method}` rank {rank}",
                            ("--method", method, "--rank", rank, *PLAIN), keep=rank == "64" and prefix == "w4a8"))
    return rows


def table_rows() -> list[Row]:
    pc, g128 = "W4A8, per-channel weights (RTN base)", "W4A8, group-128 weights (RTN base)"
    rows = [
        Row("fp", "Reference points", "full precision (float32 weights and compute)", quantized=False),
        Row("w8a8-rtn", "Reference points", "W8A8 `rtn`", ("--method", "rtn", "--w-bits", "8", *PLAIN), baseline=""),
        Row("defaults", "Reference points", "**`aser-quantize` defaults** (W4A8 per-channel, 3% budget)", ()),
        Row("w4a8-rtn", pc, "`rtn`", ("--method", "rtn", *PLAIN)),
        Row("w4a8-smoothquant", pc, "`smoothquant` (alpha 0.5)", ("--method", "smoothquant", *PLAIN)),
        *_lowrank_rows(pc, "w4a8"),
        Row("g128-rtn", g128, "`rtn`", ("--method", "rtn", "--group-size", "128", *PLAIN), baseline="g128-rtn"),
        Row("g128-smoothquant", g128, "`smoothquant` (alpha 0.5)",
            ("--method", "smoothquant", "--group-size", "128", *PLAIN), baseline="g128-rtn"),
    ]
    for method in ("lorc", "er", "aser"):
        for budget in ("1", "3"):
            rows.append(Row(f"g128-{method}-b{budget}", g128, f"`{method}` budget {budget}%",
                            ("--method", method, "--group-size", "128", "--rank-budget", budget, *PLAIN),
                            baseline="g128-rtn"))
    gq = "Base quantizer: GPTQ (`--base gptq`) and clipped scales (`--clip mse`), W4A8"

    def based(rid, label, method, base, clip, *extra, baseline="w4a8-rtn"):
        return Row(rid, gq, label, ("--method", method, *extra, "--base", base, "--clip", clip, *UNROTATED),
                   baseline=baseline)

    rows += [
        based("clip-rtn", "`rtn`, clipped scales", "rtn", "rtn", "mse"),
        based("clip-aser-b3", "`aser` budget 3%, clipped scales", "aser", "rtn", "mse"),
        based("gptq-rtn", "`rtn`, GPTQ", "rtn", "gptq", "minmax"),
        based("gptq-aser-b3", "`aser` budget 3%, GPTQ", "aser", "gptq", "minmax"),
        based("gptq-clip-rtn", "`rtn`, GPTQ + clipped scales", "rtn", "gptq", "mse"),
        based("gptq-clip-er-b3", "`er` budget 3%, GPTQ + clipped scales", "er", "gptq", "mse"),
        based("gptq-clip-aser-b1", "`aser` budget 1%, GPTQ + clipped scales", "aser", "gptq", "mse",
              "--rank-budget", "1"),
        based("gptq-clip-aser-b3", "`aser` budget 3%, GPTQ + clipped scales", "aser", "gptq", "mse"),
        based("gptq-clip-g128-rtn", "`rtn` group 128, GPTQ + clipped scales", "rtn", "gptq", "mse",
              "--group-size", "128", baseline="g128-rtn"),
        based("gptq-clip-g128-aser-b3", "`aser` group 128 budget 3%, GPTQ + clipped scales", "aser", "gptq", "mse",
              "--group-size", "128", baseline="g128-rtn"),
    ]
    a6 = "W4A6, per-channel weights (RTN base unless noted)"
    rows += [
        Row("w4a6-rtn", a6, "`rtn`", ("--method", "rtn", "--a-bits", "6", *PLAIN), baseline="w4a6-rtn"),
        Row("w4a6-er-b3", a6, "`er` budget 3%", ("--method", "er", "--a-bits", "6", *PLAIN), baseline="w4a6-rtn"),
        Row("w4a6-aser-b3", a6, "`aser` budget 3%", ("--method", "aser", "--a-bits", "6", *PLAIN),
            baseline="w4a6-rtn"),
        Row("w4a6-defaults", a6, "`aser` budget 3%, GPTQ + clipped scales, `--a-bits 6`",
            ("--a-bits", "6", *UNROTATED), baseline="w4a6-rtn"),
    ]
    tune = ("Tuning around `aser` budget 3%, GPTQ + clipped scales, no rotation (W4A8 per-channel): one option "
            "changed per row")
    for outliers in ("8", "16"):  # outliers 0 is `er` (smoothing acts on the extracted channels only)
        rows.append(Row(f"tune-outliers{outliers}", tune, f"outliers {outliers}",
                        ("--outliers", outliers, *UNROTATED)))
    for alpha in ("0.25", "0.75"):
        rows.append(Row(f"tune-alpha{alpha}", tune, f"alpha {alpha}", ("--alpha", alpha, *UNROTATED)))
    rows.append(Row("tune-no-propagate", tune, "no propagation of quantized outputs", ("--no-propagate", *UNROTATED)))
    rows.append(Row("tune-separate-lowrank", tune, "one low-rank pair per projection",
                    ("--no-joint-lowrank", *UNROTATED)))
    rows += rotation_rows()
    return rows


def rotation_rows() -> list[Row]:
    """Residual-stream rotation (--rotate hadamard) and what was tried on top of it, on the GPTQ + clipped-scales
    base."""
    sec = "Rotation (`--rotate hadamard`), GPTQ + clipped scales unless noted"
    # the residual rotation alone: down_proj's online rotation pinned off (the rot4- rows add it)
    rot = ("--rotate", "hadamard", "--mlp-hadamard", "none")
    r4 = ("--rotate", "hadamard")
    g = ("--group-size", "128")

    def row(rid, label, *args, baseline="w4a8-rtn"):
        return Row(rid, sec, label, args, baseline=baseline)

    return [
        row("rot-rtn", "`rtn`, rotated", "--method", "rtn", *rot),
        row("rot-er-b3", "`er` budget 3%, rotated", "--method", "er", *rot),
        row("rot-aser-b3", "`aser` budget 3%, rotated", "--method", "aser", *rot),
        row("rot-g128-aser-b3", "`aser` group 128 budget 3%, rotated", "--method", "aser", *g, *rot,
            baseline="g128-rtn"),
        Row("rot-aser-r64", sec, "`aser` rank 64, rotated, no MLP rotation (the defaults before `--mlp-hadamard` at a fixed rank; for the rank curve)",
            ("--method", "aser", "--rank", "64", *rot), keep=True, curve="aser (defaults)"),
        row("rot-aser-r16", "`aser` rank 16 everywhere, rotated (uniform ranks at about the budget)", "--method",
            "aser", "--rank", "16", *rot),
        row("rot4-aser-b3", "`aser` budget 3%, rotated, and down_proj's input rotated online (Hadamard blocks of "
            "512, `--mlp-hadamard 512`)", "--method", "aser", *r4, "--mlp-hadamard", "512"),
        row("rot4-aser-b3-h64", "`aser` budget 3%, rotated, down_proj's input rotated online in blocks of 64",
            "--method", "aser", *r4, "--mlp-hadamard", "64"),
        row("rot4-g128-aser-b3", "`aser` group 128 budget 3%, rotated, down_proj's input rotated online (blocks of "
            "512)", "--method", "aser", *g, *r4, "--mlp-hadamard", "512", baseline="g128-rtn"),
        # calibration set: the same 32k tokens in 16 windows of 2048 (the length scored) instead of 64 of 512,
        # twice the tokens, and ten times the Gram damping
        row("rot-aser-b3-ctx2048", "`aser` budget 3%, rotated, calibrated on 16 windows of 2048 tokens",
            "--method", "aser", *rot, "--num-samples", "16", "--seq-len", "2048"),
        row("rot-aser-b3-n128", "`aser` budget 3%, rotated, calibrated on 128 windows of 512 tokens",
            "--method", "aser", *rot, "--num-samples", "128"),
        row("rot-aser-b3-damp0.1", "`aser` budget 3%, rotated, Gram damping 0.1", "--method", "aser", *rot,
            "--damp", "0.1"),
    ]


def run(cmd: list[str], log: Path) -> None:
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")


def evaluate(model: Path, texts: dict[str, str], work: Path, log: Path, extra: tuple[str, ...] = (),
             sets: dict[str, int] = EVAL_SETS) -> dict:
    scores = {}
    for name, windows in sets.items():
        out = work / f"eval-{name}.json"
        run(["aser-eval", str(model), "--text", texts[name], "--window", str(WINDOW), "--max-windows",
             str(windows), "--quiet", "--output", str(out), *extra], log)
        result = json.loads(out.read_text())
        scores[name] = {"ppl": result["ppl"], "tokens": result["tokens"], "seconds": result["seconds"]}
    return scores


def run_row(row: Row, assets: dict, work: Path, log: Path) -> dict:
    model = Path(assets["model"])
    record: dict = {"command": row_command(row), "options": resolved_options(row), "eval": EVAL_SETS,
                    "window": WINDOW}
    if row.quantized:
        artifact = work / row.id
        run(["aser-quantize", str(model), str(artifact), "--calib", assets["calib"], "--quiet", "--overwrite",
             *row.args], log)
        report = json.loads((artifact / "aser_report.json").read_text())
        totals = report["totals"]
        record |= {k: totals[k] for k in ("extra_params_percent", "mean_rank", "quantize_seconds", "peak_rss_mib",
                                          "mean_rel_output_error_quantized", "mean_rel_output_error_reconstructed")}
        record["scores"] = evaluate(artifact, assets["eval"], work, log)
        if not row.keep:
            shutil.rmtree(artifact)
    else:
        record["scores"] = evaluate(model, assets["eval"], work, log)
    return record


def resolved_options(row: Row) -> dict | None:
    """Every option the row's command resolves to (defaults included): a row is cached only while these match,
    so changing a default recomputes the rows it affects."""
    if not row.quantized:
        return None
    from vllm_aser_offline.cli import build_parser
    from vllm_aser_offline.options import QuantizeOptions

    parsed = vars(build_parser().parse_args(["MODEL", "OUT", "--calib", "SOTU", *row.args]))
    return QuantizeOptions(**{k: v for k, v in parsed.items() if k in QuantizeOptions.__dataclass_fields__}).to_dict()


# Options added after rows were cached, each with the value that reproduces the behaviour from before it
# existed: a cached row without the option still matches a row that resolves to that value.
ADDED_OPTIONS = {"rotate": "none", "moe_min_tokens": None, "device": "auto", "mlp_hadamard": "none"}
# Options since removed (they measured worse; docs/ACCURACY.md), each with the value the quantizer now always
# uses: a cached row recorded with that value still matches, one recorded with another cannot be reproduced.
REMOVED_OPTIONS = {"fit_target": "layer", "rank_weight": "relative", "refit_scales": False}
# Option values that resolve to another on the table's model: SmolLM2's blocks are rotatable, so auto is hadamard
RESOLVED_ON_SMOLLM2 = {"rotate": {"auto": "hadamard"}}


def is_cached(row: Row, results: dict) -> bool:
    """Cached while the row resolves to the options it was computed with (the command line may spell them
    differently, e.g. a newly pinned option at its old behaviour)."""
    rec = results.get(row.id)
    if rec is None or rec.get("eval") != EVAL_SETS:
        return False
    if not row.quantized:
        return rec.get("command") == row_command(row)
    resolved = resolved_options(row)
    for option, values in RESOLVED_ON_SMOLLM2.items():
        resolved[option] = values.get(resolved[option], resolved[option])
    if resolved.get("mlp_hadamard") == "auto":  # what auto does on SmolLM2 (MLP width 1536)
        applies = resolved["rotate"] == "hadamard" and resolved["group_size"] == -1 and resolved["export"] == "aser"
        resolved["mlp_hadamard"] = "512" if applies else "none"
    recorded = {**ADDED_OPTIONS, **rec.get("options", {})}
    for option, value in REMOVED_OPTIONS.items():
        if recorded.pop(option, value) != value:
            return False
    return recorded == resolved


def row_command(row: Row) -> str:
    if not row.quantized:
        return "(source model)"
    return " ".join(["aser-quantize", "MODEL", "OUT", "--calib", "SOTU", *row.args])


def curve_name(row: Row) -> str:
    return row.curve or row.args[row.args.index("--method") + 1]


def rank_curve(rows: list[Row], results: dict, assets: dict, work: Path, log: Path) -> dict:
    """Perplexity against rank from ONE calibration run per method: the rank-64 artifact's factors are ordered
    by singular value, so its first r components are the rank-r reconstruction (aser-eval --lowrank-rank)."""
    curve: dict = results.get("_rank_curve", {})
    for row in rows:
        if not (row.keep and (work / row.id).exists()):
            continue
        method = curve_name(row)
        points = curve.get(method, {})
        for rank in CURVE_RANKS:
            if str(rank) in points:
                continue
            print(f"  curve {method} rank {rank}", flush=True)
            score = evaluate(work / row.id, assets["eval"], work, log, ("--lowrank-rank", str(rank)),
                             {"wikipedia": CURVE_WINDOWS})
            points[str(rank)] = score["wikipedia"]["ppl"]
            curve[method] = points
            results["_rank_curve"] = curve
            save(results)
    return curve


def save(results: dict) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def gap_closed(ppl: float, rtn: float | None, fp: float | None) -> str:
    if rtn is None or fp is None or math.isclose(rtn, fp):
        return ""
    return f"{100 * (rtn - ppl) / (rtn - fp):.0f}%"


def render(rows: list[Row], results: dict) -> str:
    get = lambda rid, src: results.get(rid, {}).get("scores", {}).get(src, {}).get("ppl")  # noqa: E731
    fp_w, fp_b = get("fp", "wikipedia"), get("fp", "bbc")
    lines = [
        "# SmolLM2-135M-Instruct: the ablation table",
        "",
        "Written by `make eval` (`python benchmarks/accuracy_table.py`); do not edit by hand. Perplexity over "
        f"non-overlapping {WINDOW}-token windows, reference backend (float32 compute): Wikipedia sample "
        f"({EVAL_SETS['wikipedia']} windows) and BBC News ({EVAL_SETS['bbc']} windows). Calibration: "
        "`aser-quantize` defaults (64 × 512 tokens of State of the Union text). \"Gap closed\" is "
        "(ppl(rtn) − ppl) / (ppl(rtn) − ppl(full precision)) on each text, against the RTN row with the same "
        "weight grid and activation bits (per-channel W4A8 RTN unless the row says otherwise). Quantization time and peak RSS are `aser-quantize`'s own.",
        "",
        f"Machine: {results.get('_machine', 'unknown')}.",
        "",
    ]
    section = None
    for row in rows:
        if row.section != section:
            section = row.section
            lines += ["", f"## {section}", "",
                      "| row | Wikipedia ppl | gap closed | BBC ppl | gap closed | extra params | mean rank | quant time | "
                      "peak RSS | command |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
        rec = results.get(row.id)
        cmd = f"`{row_command(row)}`"
        if rec is None:
            lines.append(f"| {row.label} | not run | | | | | | | | {cmd} |")
            continue
        w, b = get(row.id, "wikipedia"), get(row.id, "bbc")
        gapless = not row.quantized or row.id == row.baseline or not row.baseline
        closed = "" if gapless else gap_closed(w, get(row.baseline, "wikipedia"), fp_w)
        closed_b = "" if gapless else gap_closed(b, get(row.baseline, "bbc"), fp_b)
        extra = f"{rec['extra_params_percent']:.2f}%" if row.quantized else "—"
        rank = f"{rec['mean_rank']:.1f}" if row.quantized else "—"
        secs = f"{rec['quantize_seconds']:.0f} s" if row.quantized else "—"
        rss = f"{rec['peak_rss_mib']:.0f} MiB" if row.quantized else "—"
        lines.append(f"| {row.label} | {w:.2f} | {closed} | {b:.2f} | {closed_b} | {extra} | {rank} | {secs} | {rss} | {cmd} |")
    if fp_b:
        lines += ["", f"Full precision BBC perplexity: {fp_b:.2f}."]
    curve = results.get("_rank_curve")
    if curve:
        lines += ["", "## Perplexity against rank (one calibration run per method)", "",
                  "Each method's rank-64 artifact, evaluated with every low-rank branch truncated to its first r "
                  f"components (`aser-eval --lowrank-rank r`), Wikipedia, {CURVE_WINDOWS} windows. Later blocks "
                  "were calibrated on rank-64 outputs, so a point is not exactly a rank-r quantization run.", "",
                  "![rank curve](rank_curve.png)", "",
                  "| rank | " + " | ".join(f"`{m}`" for m in curve) + " |",
                  "|---|" + "---|" * len(curve)]
        for rank in CURVE_RANKS:
            lines.append(f"| {rank} | " + " | ".join(f"{curve[m].get(str(rank), float('nan')):.2f}"
                                                      for m in curve) + " |")
    return "\n".join(lines) + "\n"


def plot_curve(results: dict) -> None:
    curve = results.get("_rank_curve")
    if not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, points in curve.items():
        ranks = sorted(int(r) for r in points)
        label = method if "(" in method else f"{method} (RTN base, not rotated)"
        ax.plot(ranks, [points[str(r)] for r in ranks], marker="o", label=label.replace("(defaults)", "(defaults: rotated, GPTQ + clipped)"))
    fp = results.get("fp", {}).get("scores", {}).get("wikipedia", {}).get("ppl")
    rtn = results.get("w4a8-rtn", {}).get("scores", {}).get("wikipedia", {}).get("ppl")
    if fp:
        ax.axhline(fp, color="black", linestyle="--", linewidth=1, label=f"full precision ({EVAL_SETS['wikipedia']} windows)")
    if rtn:
        ax.axhline(rtn, color="grey", linestyle=":", linewidth=1, label=f"W4A8 rtn ({EVAL_SETS['wikipedia']} windows)")
    ax.set_xlabel("rank of every low-rank branch")
    ax.set_ylabel(f"Wikipedia perplexity ({CURVE_WINDOWS} × {WINDOW} tokens)")
    ax.set_title("SmolLM2-135M W4A8 per-channel: perplexity vs rank")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT_DIR / "rank_curve.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="regular expression: run only the rows whose id matches")
    p.add_argument("--fresh", action="store_true", help="recompute rows even if results.json has them")
    p.add_argument("--list", action="store_true", help="list the rows and whether they are cached, then exit")
    p.add_argument("--no-curve", action="store_true", help="skip the rank-vs-perplexity curve")
    p.add_argument("--work", type=Path, help="where artifacts go (default: the cache, eval-work)")
    args = p.parse_args(argv)

    rows = table_rows()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    selected = [r for r in rows if not args.only or re.search(args.only, r.id)]
    if args.list:
        for r in rows:
            cached = is_cached(r, results)
            print(f"{'cached ' if cached else 'missing'}  {r.id:24s} {row_command(r)}")
        return 0
    assets = json.loads(subprocess.run([sys.executable, "examples/prepare_assets.py", "--eval-text"], cwd=ROOT,
                                       check=True, capture_output=True, text=True).stdout)
    work = args.work or Path(assets["model"]).parents[1] / "eval-work"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "accuracy_table.log"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness.machine import describe_machine

    results["_machine"] = describe_machine()
    for row in selected:
        curve_needs_artifact = row.keep and not args.no_curve and not (work / row.id).exists() and any(
            str(r) not in results.get("_rank_curve", {}).get(curve_name(row), {}) for r in CURVE_RANKS)
        if is_cached(row, results) and not args.fresh and not curve_needs_artifact:
            continue
        start = time.perf_counter()
        print(f"row {row.id}: {row_command(row)}", flush=True)
        results[row.id] = run_row(row, assets, work, log)
        save(results)
        (OUT_DIR / "TABLE.md").write_text(render(rows, results))
        w = results[row.id]["scores"]["wikipedia"]["ppl"]
        print(f"  wikipedia ppl {w:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)
    if not args.no_curve:
        rank_curve(selected, results, assets, work, log)
        plot_curve(results)
    save(results)
    (OUT_DIR / "TABLE.md").write_text(render(rows, results))
    print(f"wrote {OUT_DIR / 'TABLE.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
