"""How much the calibration loss cares about each linear's output: the weight of its error in the rank budget.

The budget's default gain is a unit's output-error energy relative to the layer's own output energy, so every
layer's relative error counts the same. To second order the loss grows by about 1/2 sum over tokens and outputs of
E[g^2] * dy^2 (g: the gradient of the loss at the layer's output, dy: the output error), so with
`--rank-weight fisher` a unit's gain is its error energy times the mean squared output gradient of its layers,
measured once on the full-precision model with a backward pass over a few calibration windows.

That pass holds the whole model and its activations (not one block): for SmolLM2-135M about 1.5 GB; for
8B-class models it needs the memory of a training step on `--sensitivity-windows` windows.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm


def output_sensitivity(model_dir: str | Path, windows: torch.Tensor, progress: bool = True) -> dict[str, float]:
    """{linear name: mean over tokens and output features of (d loss / d output)^2}; windows: [n, seq] token ids.
    Rotation leaves these unchanged (orthogonal maps keep the gradient's norm), so the unrotated model serves."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.requires_grad_(False)
    head = model.get_output_embeddings()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def track(name: str):
        def hook(module, grad_input, grad_output):
            g = grad_output[0].detach().double()
            sums[name] = sums.get(name, 0.0) + float(g.pow(2).sum())
            counts[name] = counts.get(name, 0) + g.numel()
        return hook

    handles = [module.register_full_backward_hook(track(name)) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and module is not head]
    # the graph starts at the embeddings' output: no weight gradients are needed, only the outputs'
    handles.append(model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_()))
    try:
        for window in tqdm(windows.split(1), desc="output sensitivity", unit="window", disable=not progress):
            model(input_ids=window, labels=window).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    del model
    return {name: sums[name] / counts[name] for name in sums}


def unit_sensitivity(members: list[tuple[str, int]], sensitivity: dict[str, float]) -> float | None:
    """A low-rank unit's weight: its members' sensitivities averaged by output width (a shared down-projection
    reconstructs their stacked outputs); None when a member was not measured (e.g. an unfused MoE expert)."""
    if any(name not in sensitivity for name, _ in members):
        return None
    return sum(sensitivity[name] * width for name, width in members) / sum(width for _, width in members)
