"""Symmetric round-to-nearest integer quantization of weights (per output channel or per group)."""

from __future__ import annotations

import torch

from vllm_aser.kernels.reference import dequantize_weight


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in] in [-(2^(b-1)-1), 2^(b-1)-1], scale float32 [out, n_groups]).

    The grid is symmetric around zero (no -2^(b-1)) so that it is also exactly representable in int8 after
    per-channel requantization.
    """
    qmax = 2 ** (bits - 1) - 1
    out_features, in_features = w.shape
    wf = w.float()
    if group_size == -1:
        scale = wf.abs().amax(dim=1, keepdim=True) / qmax
        expanded = scale
    else:
        n_groups = -(-in_features // group_size)
        padded = torch.zeros(out_features, n_groups * group_size, dtype=torch.float32)
        padded[:, :in_features] = wf
        scale = padded.view(out_features, n_groups, group_size).abs().amax(dim=2) / qmax
        expanded = scale.repeat_interleave(group_size, dim=1)[:, :in_features]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    expanded = torch.where(expanded > 0, expanded, torch.ones_like(expanded))
    q = torch.clamp(torch.round(wf / expanded), -qmax, qmax).to(torch.int8)
    return q, scale.float()


def quantization_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """E = W - dequant(Q(W)), float64."""
    return w.double() - dequantize_weight(q, scale, group_size).double()
