"""The per-layer report (aser_report.json): what each layer cost and how much error it kept."""

from __future__ import annotations

from vllm_aser_offline.quantize.layer_quant import QuantizedLinear


def layer_entry(result: QuantizedLinear) -> dict:
    out_f, in_f = result.out_features, result.in_features
    return {
        "name": result.name,
        "shape": [out_f, in_f],
        "rank": result.rank,
        "outlier_channels": result.outliers,
        "rel_output_error_quantized": round(result.relative_error(0), 6),
        "rel_output_error_reconstructed": round(result.relative_error(), 6),
        "shares_lowrank_down_with": result.shares - 1,
        "extra_params": round(result.extra_params, 1),
        "extra_params_percent": round(100 * result.extra_params / (out_f * in_f), 4),
    }


def build_report(
    results: list[QuantizedLinear], provenance: dict, unquantized: list[dict] = (), moe: dict | None = None
) -> dict:
    """`unquantized`: block weights kept in full precision besides norms (and why); `moe`: how the experts
    were calibrated."""
    layers = [layer_entry(r) for r in results]
    weight_params = sum(r.out_features * r.in_features for r in results)
    extra = round(sum(r.extra_params for r in results))
    mean = lambda key: sum(e[key] for e in layers) / max(len(layers), 1)  # noqa: E731
    return {
        "totals": {
            "quantized_layers": len(layers),
            "weight_params": weight_params,
            "extra_params": extra,
            "extra_params_percent": round(100 * extra / max(weight_params, 1), 4),
            "mean_rank": round(sum(e["rank"] for e in layers) / max(len(layers), 1), 2),
            "mean_rel_output_error_quantized": round(mean("rel_output_error_quantized"), 6),
            "mean_rel_output_error_reconstructed": round(mean("rel_output_error_reconstructed"), 6),
        },
        "provenance": provenance,
        "unquantized": list(unquantized),
        "moe": moe,
        "layers": layers,
    }
