"""Where aser-quantize computes (--device): the block, its inputs and every tensor the quantizer creates go there."""

from __future__ import annotations

import torch


def compute_device(name: str) -> torch.device:
    """Where blocks are calibrated and quantized: --device auto takes the GPU when torch sees one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False; a CPU-only "
                         "torch build, or no driver); use --device cpu")
    return torch.device(name)


def to_device(value, device: torch.device):
    """Block keyword arguments (masks, rotary cos/sin, nested in tuples or dicts) on the compute device."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value
