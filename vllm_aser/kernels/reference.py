"""Plain-torch ASER math: the oracle every fast kernel is tested against.

No vLLM import: the offline quantizer's simulation and the vLLM `reference` kernel run this same code, so
"the torch reference of an artifact" means exactly one thing.
"""

from __future__ import annotations

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from vllm_aser.kernels.hadamard import block_hadamard


def pack_int(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integers [out, in] (int8 storage) -> compressed-tensors int32 layout [out, ceil(in*bits/32)]."""
    return pack_to_int32(q.to(torch.int8), bits, packed_dim=1)


def unpack_int(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of `pack_int`: int32 [out, ceil(in*bits/32)] -> signed int8 [out, in]."""
    shape = torch.Size((packed.shape[0], in_features))
    return unpack_from_int32(packed, bits, shape, packed_dim=1).to(torch.int8)


def expand_group_scale(scale: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[out, n_groups] scales -> [out, in] (a group's scale repeated over its columns)."""
    if group_size == -1:
        return scale.expand(-1, in_features)
    return scale.repeat_interleave(group_size, dim=1)[:, :in_features]


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    return q.float() * expand_group_scale(scale.float(), q.shape[1], group_size)


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric dynamic per-token quantize-dequantize (what the int8 activation path computes)."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / qmax
    return torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale


def aser_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    inv_smooth: torch.Tensor | None,
    down: torch.Tensor | None,
    up: torch.Tensor | None,
    bias: torch.Tensor | None,
    act_bits: int,
    hadamard: int = 0,
) -> torch.Tensor:
    """y = Q_a(x / s) @ W_deq^T + ((x / s) @ down^T) @ up^T + bias, computed in float32.

    `weight` is the dequantized int weight [out, in] (float32); `inv_smooth` is 1 / smooth_scale; `hadamard` > 0
    rotates x first (x blockdiag(H_b) / sqrt(b), the artifact's `input_hadamard`).
    """
    xf = x.float() if not hadamard else block_hadamard(x, hadamard)
    if inv_smooth is not None:
        xf = xf * inv_smooth.float()
    y = (fake_quantize_per_token(xf, act_bits) if act_bits < 16 else xf) @ weight.t()  # 16: unquantized
    if down is not None:
        y = y + (xf @ down.float().t()) @ up.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
