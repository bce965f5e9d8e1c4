"""`aser-report`: the per-layer error report of an ASER directory as a readable summary, worst layers first."""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from vllm_aser import format as fmt


def load_report(model_dir: Path) -> dict:
    path = model_dir / fmt.REPORT_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: aser-report reads the report that aser-quantize writes")
    return json.loads(path.read_text())


def summarize(report: dict, top: int = 10) -> str:
    totals, layers = report["totals"], report["layers"]
    opts = report.get("provenance", {}).get("options", {})
    group = "per-channel" if opts.get("group_size", -1) == -1 else f"group {opts.get('group_size')}"
    lines = [
        f"method {opts.get('method', '?')}, base {opts.get('base', 'rtn')}, W{opts.get('w_bits', '?')}"
        f"A{opts.get('a_bits', '?')} {group}, rank rule {report.get('provenance', {}).get('rank_rule', '?')}",
        f"{totals['quantized_layers']} layers, extra parameters {totals['extra_params_percent']:.2f}% "
        f"(mean rank {totals['mean_rank']:.1f})",
        f"mean relative output error on calibration data: {totals['mean_rel_output_error_quantized']:.4f} (int4) "
        f"-> {totals['mean_rel_output_error_reconstructed']:.4f} (with the low-rank branch)",
        *_structure_lines(report),
        "",
        "by projection (mean over blocks):",
        f"  {'projection':12s} {'layers':>6s} {'rank':>6s} {'int4 err':>9s} {'with LR':>8s} {'removed':>8s}",
    ]
    kinds: dict[str, list[dict]] = defaultdict(list)
    for layer in layers:
        kinds[layer["name"].rsplit(".", 1)[-1]].append(layer)
    for kind, group_layers in kinds.items():
        n = len(group_layers)
        q = sum(layer["rel_output_error_quantized"] for layer in group_layers) / n
        r = sum(layer["rel_output_error_reconstructed"] for layer in group_layers) / n
        rank = sum(layer["rank"] for layer in group_layers) / n
        lines.append(f"  {kind:12s} {n:6d} {rank:6.1f} {q:9.4f} {r:8.4f} {100 * (1 - r / q) if q else 0:7.1f}%")
    worst = sorted(layers, key=lambda layer: layer["rel_output_error_reconstructed"], reverse=True)[:top]
    lines += ["", f"worst {len(worst)} layers by error left after the low-rank branch:",
              f"  {'layer':40s} {'shape':>11s} {'rank':>5s} {'int4 err':>9s} {'with LR':>8s}  outlier channels"]
    for layer in worst:
        shape = "x".join(str(d) for d in layer["shape"])
        lines.append(f"  {layer['name']:40s} {shape:>11s} {layer['rank']:5d} {layer['rel_output_error_quantized']:9.4f} "
                     f"{layer['rel_output_error_reconstructed']:8.4f}  {layer['outlier_channels']}")
    return "\n".join(lines)


def _structure_lines(report: dict) -> list[str]:
    """Rotation, weights kept in full precision, and how MoE experts were calibrated (reports written since they
    were added; older reports have none of it)."""
    provenance, lines = report.get("provenance", {}), []
    if provenance.get("rotation"):
        lines.append(f"rotation: {provenance['rotation']['kind']}")
    elif provenance.get("rotation_refused"):
        lines.append(f"not rotated: {provenance['rotation_refused']}")
    for entry in report.get("unquantized", []):
        lines.append(f"kept in full precision: {entry['name']} {entry['shape']} ({entry['reason']})")
    if moe := report.get("moe"):
        starved = moe["starved_experts"]
        lines.append(f"MoE: {len(starved)} expert(s) routed fewer than {moe['min_routed_tokens']} calibration tokens, "
                     "calibrated on all tokens of their layer" + (f" (e.g. {starved[0]['expert']})" if starved else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="aser-report", description=__doc__)
    p.add_argument("model_dir", type=Path, help="a directory written by aser-quantize")
    p.add_argument("--top", type=int, default=10, help="how many of the worst layers to list")
    args = p.parse_args(argv)
    try:
        print(summarize(load_report(args.model_dir), args.top))
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
        print(f"aser-report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
