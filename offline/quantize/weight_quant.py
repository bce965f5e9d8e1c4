"""Symmetric round-to-nearest integer quantization of weights (per output channel or per group)."""

from __future__ import annotations

import torch

from vllm_aser.kernels.reference import dequantize_weight


CLIP_RATIOS = torch.linspace(1.0, 0.5, 26)  # candidate fractions of the absmax scale, step 0.02
CLIP_CHUNK_ELEMENTS = 1 << 18  # weights per chunk of rows in the clipping search (1 MiB of float32)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group] (zero-padded; per channel = one group of all columns)."""
    out_features, in_features = x.shape
    if group_size == -1:
        return x.reshape(out_features, 1, in_features)
    n_groups = -(-in_features // group_size)
    padded = torch.zeros(out_features, n_groups * group_size, dtype=x.dtype)
    padded[:, :in_features] = x
    return padded.view(out_features, n_groups, group_size)


def choose_scales(
    w: torch.Tensor, bits: int, group_size: int, importance: torch.Tensor | None = None
) -> torch.Tensor:
    """Scales [out, n_groups]: absmax / qmax, or with `importance` (the input's mean square per channel, the
    diagonal of the Gram matrix) the clipped scale among CLIP_RATIOS that minimizes the importance-weighted
    squared rounding error of each channel or group. Clipping trades a few large weights for a finer grid."""
    qmax = 2 ** (bits - 1) - 1
    wg = _grouped(w.float(), group_size)
    absmax = wg.abs().amax(dim=2)
    absmax = torch.where(absmax > 0, absmax, torch.full_like(absmax, qmax))
    base = absmax / qmax
    if importance is None:
        return base
    imp = _grouped(importance.float().reshape(1, -1), group_size)  # [1, n_groups, group]
    best = base.clone()
    # rows in chunks that stay in cache across the candidate ratios (same arithmetic as all rows at once)
    chunk = max(1, CLIP_CHUNK_ELEMENTS // max(wg.shape[1] * wg.shape[2], 1))
    for rows in range(0, wg.shape[0], chunk):
        w_rows, b_rows = wg[rows:rows + chunk], base[rows:rows + chunk]
        best_err = torch.full_like(b_rows, float("inf"))
        best_rows = best[rows:rows + chunk]
        for ratio in CLIP_RATIOS.tolist():
            s = (b_rows * ratio)[:, :, None]
            err = ((w_rows - torch.clamp(torch.round(w_rows / s), -qmax, qmax) * s).pow(2) * imp).sum(dim=2)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_rows.copy_(torch.where(better, b_rows * ratio, best_rows))
    return best


def quantize_with_scales(w: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    expanded = scale if group_size == -1 else scale.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    return torch.clamp(torch.round(w.float() / expanded), -qmax, qmax).to(torch.int8)


def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (q int8 [out, in] in [-(2^(b-1)-1), 2^(b-1)-1], scale float32 [out, n_groups]).

    The grid is symmetric around zero (no -2^(b-1)) so that it is also exactly representable in int8 after
    per-channel requantization. `importance` turns on the clipping search of `choose_scales`.
    """
    scale = choose_scales(w, bits, group_size, importance)
    return quantize_with_scales(w, scale, bits, group_size), scale.float()


def quantization_error(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """E = W - dequant(Q(W)), float64."""
    return w.double() - dequantize_weight(q, scale, group_size).double()
