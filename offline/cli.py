"""aser-quantize: command line of the offline quantizer."""

from __future__ import annotations

import argparse
import json
import sys

from vllm_aser_offline import __version__
from vllm_aser_offline.options import (
    BASES,
    CLIPS,
    DEVICES,
    DTYPES,
    EXPORTS,
    METHODS,
    ROTATIONS,
    OptionsError,
    QuantizeOptions,
)


def build_parser() -> argparse.ArgumentParser:
    defaults = QuantizeOptions()
    p = argparse.ArgumentParser(
        prog="aser-quantize",
        description="Quantize a Hugging Face causal LM with ASER (W4A8 + low-rank error reconstruction) "
        "into a model directory that `vllm serve DIR --quantization aser` loads.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model_dir", help="source Hugging Face model directory (config.json, safetensors, tokenizer)")
    p.add_argument("output_dir", help="where to write the ASER model (refused if it exists, see --overwrite)")
    p.add_argument("--calib", required=True,
                   help="calibration data: a text file, a .jsonl file (one {'text': ...} or chat {'messages': [...]} "
                   "record per line; chats are rendered with the model's chat template), or a folder of them")
    p.add_argument("--calib-suffix", action="append", default=None, metavar="SUFFIX",
                   help="in a --calib folder, read the files ending in SUFFIX (repeatable, e.g. --calib-suffix .py "
                   "to calibrate a code model on source files; default: .txt and .jsonl)")
    p.add_argument("--num-samples", type=int, default=defaults.num_samples, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="windows per forward pass")
    p.add_argument("--method", choices=METHODS, default=defaults.method,
                   help="aser: smoothing+extraction+whitened reconstruction; er: reconstruction only; "
                   "smoothquant: smoothing, no low-rank; lorc: plain SVD of the weight error; rtn: plain W4A8")
    p.add_argument("--w-bits", type=int, default=defaults.w_bits, choices=(4, 8), help="weight bits")
    p.add_argument("--a-bits", type=int, default=defaults.a_bits, help="activation bits (per-token, symmetric)")
    p.add_argument("--group-size", type=int, default=defaults.group_size,
                   help="weight quantization group size; -1 = one scale per output channel")
    p.add_argument("--base", choices=BASES, default=defaults.base,
                   help="base weight quantizer under the low-rank branch: rtn (round to nearest) or gptq "
                   "(error feedback through the calibration Hessian)")
    p.add_argument("--clip", choices=CLIPS, default=defaults.clip,
                   help="weight scales: minmax (absmax of each channel/group) or mse (the clipped scale that "
                   "minimizes the input-weighted rounding error)")
    p.add_argument("--rotate", choices=ROTATIONS, default=defaults.rotate,
                   help="hadamard: rotate the residual stream by a random Hadamard matrix folded into the weights "
                   "(norm weights folded into the linears; no cost at serving), which spreads outlier channels "
                   "before quantization; auto: hadamard where the model's structure allows it (Llama-style "
                   "blocks with plain RMSNorms), none otherwise (e.g. Gemma 3, Phi-3), with a message")
    p.add_argument("--quantize-head", action="store_true",
                   help="quantize lm_head too (W4A8 with a low-rank branch from the same budget; embeddings stay "
                   "unquantized): a decode step reads the head whole, so this cuts the bytes per token of models with "
                   "large vocabularies, at a perplexity cost the report and docs/ACCURACY.md state")
    p.add_argument("--mlp-hadamard", default=defaults.mlp_hadamard, metavar="auto|none|B",
                   help="rotate down_proj's input at run time by block-diagonal Walsh-Hadamard transforms of order B "
                   "(a power of two; QuaRot's online R4), its inverse folded into the weights: spreads the MLP's "
                   "inner outliers before int4/int8 quantization, at a cost at serving (SmolLM2 on a 2-core CPU: "
                   "-0.8%% perplexity, -0.5 to -2.5%% vLLM throughput; docs/ACCURACY.md); default none. auto: with the "
                   "residual rotation and per-channel weights (group scales measured worse with it), the largest "
                   "power of two dividing the MLP width, at most 512 (each tensor-parallel rank must hold whole "
                   "blocks); gated MLPs only (MoE experts are not rotated)")
    p.add_argument("--moe-min-tokens", type=int, default=defaults.moe_min_tokens,
                   help="MoE: an expert routed fewer calibration tokens than this is calibrated on every token "
                   "entering its layer instead (default: the expert's input width)")
    p.add_argument("--no-act-order", dest="act_order", action="store_false",
                   help="gptq: round columns in stored order instead of by decreasing Hessian diagonal")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, help="fixed rank of every low-rank branch (padded to a multiple of 8)")
    rank.add_argument("--rank-energy", type=float,
                      help="per layer, the smallest rank that removes this fraction of the whitened error energy")
    rank.add_argument("--rank-budget", type=float, default=defaults.rank_budget,
                      help="extra parameters in percent of the quantized weights, allocated across all layers "
                      "where they remove the most output error (default rule)")
    p.add_argument("--max-rank", type=int, default=defaults.max_rank, help="cap on any layer's rank")
    p.add_argument("--alpha", type=float, default=defaults.alpha, help="smoothing migration strength")
    p.add_argument("--outliers", type=int, default=defaults.outliers,
                   help="aser: input channels smoothed and extracted into the low-rank branch per layer")
    p.add_argument("--damp", type=float, default=defaults.damp, help="Gram damping, fraction of its mean diagonal")
    p.add_argument("--no-propagate", dest="propagate_quantized", action="store_false",
                   help="calibrate each block on full-precision inputs instead of the quantized blocks' outputs")
    p.add_argument("--no-joint-lowrank", dest="joint_lowrank", action="store_false",
                   help="one low-rank pair per projection instead of one shared down-projection per fused group "
                   "(q/k/v, gate/up) from a joint SVD")
    p.add_argument("--export", choices=EXPORTS, default=defaults.export,
                   help="aser: the ASER format (vllm serve --quantization aser); compressed-tensors: a W8A8 or W4A16 "
                   "baseline for vLLM's in-tree compressed-tensors support (needs --method rtn)")
    p.add_argument("--dtype", choices=DTYPES, default=defaults.dtype, help="dtype of unquantized tensors")
    p.add_argument("--lowrank-dtype", choices=DTYPES, help="dtype of the low-rank factors (default: --dtype)")
    p.add_argument("--device", choices=DEVICES, default=defaults.device,
                   help="where blocks are calibrated and quantized (auto: cuda when torch sees a GPU). Memory on "
                   "the device: one decoder block in float32, the calibration activations entering and leaving it "
                   "(2 x num-samples x seq-len x hidden x 4 bytes), and the float64 Gram matrix of each input the "
                   "block's linears share (in_features^2 x 8 bytes each); blocks are read from disk one at a time")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed for the choice of calibration windows")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--version", action="version", version=f"aser-quantize {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    option_names = set(QuantizeOptions.__dataclass_fields__)
    try:
        opts = QuantizeOptions(**{k: v for k, v in vars(args).items() if k in option_names})
    except OptionsError as exc:
        print(f"aser-quantize: error: {exc}", file=sys.stderr)
        return 2
    from vllm_aser_offline.pipeline import quantize_model

    try:
        summary = quantize_model(args.model_dir, args.output_dir, args.calib, opts, args.overwrite, not args.quiet,
                                 args.calib_suffix)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"aser-quantize: error: {exc}", file=sys.stderr)
        return 1
    totals = summary.report["totals"]
    print(json.dumps({"output_dir": str(summary.output_dir), **totals}, indent=2))
    print(
        f"wrote {summary.output_dir} in {summary.seconds:.1f} s, peak RSS {summary.peak_rss_mib:.0f} MiB; "
        f"extra params {totals['extra_params_percent']:.2f}%, mean relative output error "
        f"{totals['mean_rel_output_error_quantized']:.4f} -> {totals['mean_rel_output_error_reconstructed']:.4f}",
        file=sys.stderr,
    )
    report = summary.report
    if report["provenance"].get("rotation_refused"):
        print(f"rotation: not applied (--rotate auto): {report['provenance']['rotation_refused']}", file=sys.stderr)
    mlp_rotation = report["provenance"].get("mlp_rotation")
    if mlp_rotation:
        print(f"MLP rotation: {mlp_rotation['layers']} down_proj input(s) rotated at run time in Hadamard blocks of "
              f"{mlp_rotation['hadamard_block']} (format_version 2: needs this vllm-aser or newer to serve)",
              file=sys.stderr)
    elif opts.mlp_hadamard == "auto" and report["provenance"].get("mlp_rotation_refused"):
        print(f"MLP rotation: not applied (--mlp-hadamard auto): {report['provenance']['mlp_rotation_refused']}",
              file=sys.stderr)
    for entry in report.get("unquantized", []):
        print(f"kept in full precision: {entry['name']} {entry['shape']}: {entry['reason']}", file=sys.stderr)
    moe = report.get("moe")
    if moe:
        starved = moe["starved_experts"]
        print(f"MoE: {len(starved)} expert(s) saw fewer than {moe['min_routed_tokens']} routed calibration tokens "
              "and were calibrated on all tokens entering their layer"
              + (": " + ", ".join(f"{s['expert']} ({s['routed_tokens']})" for s in starved[:8])
                 + (" ..." if len(starved) > 8 else "") if starved else ""), file=sys.stderr)
    rotation = summary.report["provenance"].get("rotation")
    if rotation and rotation["untied_embeddings"]:
        print("rotation: the tied embeddings were untied (the head carries the final norm's weight, the embedding "
              "does not), so the output directory holds a separate lm_head.weight", file=sys.stderr)
    return 0
