"""Baseline checkpoints in compressed-tensors format (W8A8 int8, W4A16 int4), for vLLM's in-tree support.

The throughput comparison needs the alternatives quantized by the same tool from the same model, with nothing
from a model hub: `aser-quantize --export compressed-tensors --method rtn` runs the usual pipeline (RTN or GPTQ
base, no smoothing, no low-rank branch) and hands the codes to compressed-tensors' own compressors, which write
the tensor names and the `quantization_config` vLLM's compressed-tensors loader reads.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors import IntQuantizationCompressor, PackedQuantizationCompressor
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStrategy,
)

from vllm_aser_offline.quantize.layer_quant import QuantizedLinear
from vllm_aser_offline.options import QuantizeOptions
from vllm_aser.kernels.reference import dequantize_weight

FORMATS = {(8, 8): "int-quantized", (4, 16): "pack-quantized"}  # (weight bits, activation bits) -> format


def scheme_for(opts: QuantizeOptions) -> tuple[QuantizationScheme, str]:
    fmt_name = FORMATS[(opts.w_bits, opts.a_bits)]
    per_channel = opts.group_size == -1
    weights = QuantizationArgs(
        num_bits=opts.w_bits, type="int", symmetric=True,
        strategy=QuantizationStrategy.CHANNEL if per_channel else QuantizationStrategy.GROUP,
        group_size=None if per_channel else opts.group_size,
    )
    activations = None
    if opts.a_bits == 8:  # dynamic per-token int8, like ASER's activations
        activations = QuantizationArgs(num_bits=8, type="int", symmetric=True,
                                       strategy=QuantizationStrategy.TOKEN, dynamic=True)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations), fmt_name


def compressed_tensors(result: QuantizedLinear, scheme: QuantizationScheme, fmt_name: str, group_size: int,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One linear's tensors; the compressor re-derives the codes from q * scale, which reproduces q exactly."""
    if result.rank or not bool(torch.all(result.smooth == 1)):
        raise ValueError(f"{result.name}: compressed-tensors export holds plain int weights only "
                         "(no smoothing, no low-rank branch): use --method rtn")
    if group_size != -1 and result.in_features % group_size:
        raise ValueError(f"{result.name}: {result.in_features} input features are not a multiple of --group-size "
                         f"{group_size}, which compressed-tensors requires: pick a group size that divides it")
    state = {"weight": dequantize_weight(result.q, result.scale, group_size), "weight_scale": result.scale.float()}
    compressor = IntQuantizationCompressor if fmt_name == "int-quantized" else PackedQuantizationCompressor
    compressed = compressor.compress(state, scheme)
    tensors = {f"{result.name}.{key}": value for key, value in compressed.items() if value is not None}
    if result.bias is not None:
        tensors[f"{result.name}.bias"] = result.bias.to(dtype).contiguous()
    return tensors


def quantization_config(scheme: QuantizationScheme, fmt_name: str, ignore: list[str]) -> dict:
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt_name,
                                quantization_status="compressed", ignore=ignore)
    return config.model_dump(exclude_none=True)
