"""The kernels as torch custom ops, so that torch.compile treats each ASER linear as one opaque call.

`apply()` runs once at trace time under vLLM's compilation; the work happens in these ops at run time.
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as vllm_ops
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_aser.kernels.reference import aser_linear

_LIB = torch.library.Library("vllm_aser", "FRAGMENT")  # noqa: TID251


def _out_like(x: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def reference_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    inv_smooth: torch.Tensor | None,
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    bias: torch.Tensor | None,
    act_bits: int,
) -> torch.Tensor:
    return aser_linear(x, weight, inv_smooth, down, up, bias, act_bits)


def _reference_fake(x, weight, inv_smooth, down, up, bias, act_bits) -> torch.Tensor:
    return _out_like(x, weight.shape[0])


def quantize_per_token(x: torch.Tensor, act_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8 (vLLM's op for 8 bits; narrower grids in torch)."""
    if act_bits == 8:
        x_q, x_s, _ = vllm_ops.onednn_scaled_int8_quant(x, None, None, True)
        return x_q, x_s
    qmax = 2 ** (act_bits - 1) - 1
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / qmax
    return torch.clamp(torch.round(x.float() / scale), -qmax, qmax).to(torch.int8), scale


# Rows up to which the low-rank branch runs in float32 on CPU; above it, in the activation dtype. On AMX CPUs a
# float32 rank-16 branch is 2-4x faster than a bf16 one for a few rows (bf16 GEMMs have a ~40 us floor there) and
# 2-5x slower from 64 rows on (benchmarks/experiments/profile_cpu_linear.py).
CPU_FLOAT32_LOWRANK_MAX_ROWS = 32


def _add_lowrank(out: torch.Tensor, x: torch.Tensor, down, up, down_lp, up_lp) -> None:
    if down is None:
        return
    if down_lp is None or x.shape[0] <= CPU_FLOAT32_LOWRANK_MAX_ROWS:
        # cast before adding: a mixed-dtype in-place add is several times slower than cast + add
        out.add_(torch.mm(torch.mm(x.float(), down), up).to(out.dtype))
    else:  # the up-projection accumulates into the output inside the GEMM: no [M, out] temporary
        out.addmm_(torch.mm(x, down_lp), up_lp)


def cpu_linear(
    x: torch.Tensor,
    dnnl_handler: torch.Tensor,
    inv_smooth: torch.Tensor | None,
    down: torch.Tensor | None,  # float32 [in, r] (transposed)
    up: torch.Tensor | None,  # float32 [r, out]
    down_lp: torch.Tensor | None,  # the same in the activation dtype; None when that is float32
    up_lp: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    act_bits: int,
) -> torch.Tensor:
    """oneDNN path: per-token quantization, then oneDNN's int8 GEMM with per-channel scales in its epilogue."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if inv_smooth is not None:
        x2 = x2 * inv_smooth
    x_q, x_s = quantize_per_token(x2, act_bits)
    out = torch.empty((x2.shape[0], out_features), dtype=x.dtype)
    torch.ops._C.onednn_scaled_mm(out, x_q, x_s, None, None, bias, dnnl_handler)
    _add_lowrank(out, x2, down, up, down_lp, up_lp)
    return out.reshape(*shape[:-1], out_features)


def _cpu_fake(x, dnnl_handler, inv_smooth, down, up, down_lp, up_lp, bias, out_features, act_bits) -> torch.Tensor:
    return _out_like(x, out_features)


def cpu_amx_linear(
    x: torch.Tensor,
    packed_weight: torch.Tensor,  # int8 codes in the AMX VNNI layout (convert_weight_packed)
    weight_scale: torch.Tensor,  # float32 [out], per channel
    inv_smooth: torch.Tensor | None,
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    down_lp: torch.Tensor | None,
    up_lp: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """AMX path (8-bit activations): vLLM's fused dynamic per-token int8 quantization + AMX int8 GEMM, the
    kernel its in-tree W8A8 uses on these CPUs."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if inv_smooth is not None:
        x2 = x2 * inv_smooth
    out = torch.ops._C.int8_scaled_mm_with_quant(
        x2, packed_weight, weight_scale, None if bias is None else bias.float(), x.dtype, True
    )
    _add_lowrank(out, x2, down, up, down_lp, up_lp)
    return out.reshape(*shape[:-1], out.shape[-1])


def _cpu_amx_fake(x, packed_weight, weight_scale, inv_smooth, down, up, down_lp, up_lp, bias) -> torch.Tensor:
    return _out_like(x, weight_scale.shape[0])


def cuda_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    inv_smooth: torch.Tensor | None,
    down: torch.Tensor | None,
    up_t: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    in_features: int,
    out_features: int,
    act_bits: int,
) -> torch.Tensor:
    from vllm_aser.kernels.triton_w4a8 import PackedW4, aser_linear_triton

    weight = PackedW4(packed, scale, group_size, in_features, out_features)
    return aser_linear_triton(x, weight, inv_smooth, down, up_t, bias, act_bits)


def _cuda_fake(x, packed, scale, inv_smooth, down, up_t, bias, group_size, in_features, out_features, act_bits):
    return _out_like(x, out_features)


def cuda_marlin_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    perm: torch.Tensor | None,
    workspace: torch.Tensor,
    global_scale: torch.Tensor | None,
    marlin_bias: torch.Tensor | None,
    inv_smooth: torch.Tensor | None,
    down: torch.Tensor | None,
    up_t: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    act_bits: int,
    is_k_full: bool,
) -> torch.Tensor:
    """ASER's Triton kernel (smoothing, int8 codes, low-rank down) -> vLLM's Marlin W4A8 GEMM (`marlin_bias`:
    the layer's own bias, pre-permuted, in its epilogue) -> low-rank up added in place (with `bias`, any other)."""
    from vllm_aser.kernels import marlin_w4a8
    from vllm_aser.kernels.triton_w4a8 import lowrank_up_add_, smooth_quant_lowrank

    shape = x.shape
    xq, xs, t = smooth_quant_lowrank(x.reshape(-1, shape[-1]), inv_smooth, down, act_bits)
    out = marlin_w4a8.gemm(xq, xs, qweight, scales, zeros, g_idx, perm, workspace, global_scale, marlin_bias,
                           out_features, is_k_full)
    lowrank_up_add_(out, t, up_t, bias)
    return out.reshape(*shape[:-1], out_features)


def _cuda_marlin_fake(x, qweight, scales, zeros, g_idx, perm, workspace, global_scale, marlin_bias, inv_smooth, down,
                      up_t, bias, out_features, act_bits, is_k_full):
    return _out_like(x, out_features)


direct_register_custom_op("reference_linear", reference_linear, [], _reference_fake, target_lib=_LIB)
direct_register_custom_op("cpu_linear", cpu_linear, [], _cpu_fake, target_lib=_LIB)
direct_register_custom_op("cpu_amx_linear", cpu_amx_linear, [], _cpu_amx_fake, target_lib=_LIB)
direct_register_custom_op("cuda_linear", cuda_linear, [], _cuda_fake, target_lib=_LIB)
direct_register_custom_op("cuda_marlin_linear", cuda_marlin_linear, [], _cuda_marlin_fake, target_lib=_LIB)
