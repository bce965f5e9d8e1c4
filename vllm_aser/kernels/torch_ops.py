"""The kernels as torch custom ops, so that torch.compile treats each ASER linear as one opaque call.

`apply()` runs once at trace time under vLLM's compilation; the work happens in these ops at run time.
"""

from __future__ import annotations

import torch
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
        from vllm import _custom_ops as ops

        x_q, x_s, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
        return x_q, x_s
    qmax = 2 ** (act_bits - 1) - 1
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / qmax
    return torch.clamp(torch.round(x.float() / scale), -qmax, qmax).to(torch.int8), scale


def cpu_linear(
    x: torch.Tensor,
    dnnl_handler: torch.Tensor,
    inv_smooth: torch.Tensor | None,
    down: torch.Tensor | None,  # float32 [in, r]
    up: torch.Tensor | None,  # float32 [r, out]
    bias: torch.Tensor | None,
    out_features: int,
    act_bits: int,
) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if inv_smooth is not None:
        x2 = x2 * inv_smooth
    x_q, x_s = quantize_per_token(x2, act_bits)
    out = torch.empty((x2.shape[0], out_features), dtype=x.dtype)
    torch.ops._C.onednn_scaled_mm(out, x_q, x_s, None, None, bias, dnnl_handler)
    if down is not None:  # float32 factors, stored transposed: down_t [in, r], up_t [r, out]
        out.add_(torch.mm(torch.mm(x2.float(), down), up))
    return out.reshape(*shape[:-1], out_features)


def _cpu_fake(x, dnnl_handler, inv_smooth, down, up, bias, out_features, act_bits) -> torch.Tensor:
    return _out_like(x, out_features)


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


direct_register_custom_op("reference_linear", reference_linear, [], _reference_fake, target_lib=_LIB)
direct_register_custom_op("cpu_linear", cpu_linear, [], _cpu_fake, target_lib=_LIB)
direct_register_custom_op("cuda_linear", cuda_linear, [], _cuda_fake, target_lib=_LIB)
