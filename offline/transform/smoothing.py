"""Activation smoothing (SmoothQuant-style channel scales) and ASER's outlier selection."""

from __future__ import annotations

import torch


def outlier_channels(act_max: torch.Tensor, weight_max: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` input channels with the largest act_max * weight_max (sorted ascending)."""
    count = min(count, act_max.shape[0])
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    score = act_max.double() * weight_max.double()
    return torch.topk(score, count).indices.sort().values


def smoothing_scales(
    act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float, channels: torch.Tensor | None = None
) -> torch.Tensor:
    """m_j = a_j^alpha / w_j^(1-alpha) (on `channels` only when given, 1 elsewhere).

    The smoothed activation is x / m and the smoothed weight W * m (columns), so W x is unchanged.
    """
    a = act_max.double().clamp(min=1e-5)
    w = weight_max.double().clamp(min=1e-5)
    m = a.pow(alpha) / w.pow(1 - alpha)
    m = m.clamp(min=1e-4, max=1e4)
    if channels is not None:
        only = torch.ones_like(m)
        only[channels] = m[channels]
        m = only
    return m.float()
