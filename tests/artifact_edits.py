"""Make broken copies of an ASER artifact (for the error-message tests)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def copy_artifact(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def edit_tensors(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_quant_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


BROKEN = {
    "missing_tensor": (
        lambda d: edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale")),
        "'model.layers.1.mlp.up_proj.weight_scale' is missing",
    ),
    "wrong_shape": (
        lambda d: edit_tensors(
            d, lambda t: t.update({"model.layers.0.self_attn.o_proj.smooth_scale": torch.ones(7)})
        ),
        "'model.layers.0.self_attn.o_proj.smooth_scale' has shape [7], expected [128]",
    ),
    "unknown_format_version": (
        lambda d: edit_quant_config(d, lambda q: q.update(format_version=99)),
        "format_version 99 is not supported",
    ),
    "unknown_field": (
        lambda d: edit_quant_config(d, lambda q: q.update(wbits=4)),
        "unknown field(s) ['wbits']",
    ),
}


# Broken in a way only loading can see (each sub-layer's tensors are well formed; they disagree with each other):
# vLLM refuses these while loading the weights, validate_checkpoint does not read tensor values.
BROKEN_AT_LOAD = {
    "fused_siblings_smoothing_differs": (
        lambda d: edit_tensors(d, lambda t: t["model.layers.0.self_attn.k_proj.smooth_scale"].mul_(1.01)),
        "model.layers.0.self_attn.qkv_proj: its fused sub-layers carry different smooth_scale tensors",
    ),
    "fused_siblings_shared_down_differs": (
        lambda d: edit_tensors(d, lambda t: t["model.layers.1.mlp.up_proj.lowrank_down"].mul_(1.01)),
        "model.layers.1.mlp.gate_up_proj: its fused sub-layers carry different lowrank_down tensors",
    ),
}
