"""Find a causal LM's decoder blocks and the linears inside them that share an input, from its modules."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model does not have the structure the quantizer needs."""


@dataclass
class DecoderStack:
    prefix: str  # e.g. "model.layers"
    layers: nn.ModuleList


def find_decoder_stack(model: nn.Module) -> DecoderStack:
    """The longest ModuleList of identical blocks that contain linears (Llama, Qwen2, Mistral, ...)."""
    best: DecoderStack | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best.layers):
            best = DecoderStack(prefix=name, layers=module)
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no stack of decoder blocks (an nn.ModuleList of identical blocks with "
            "nn.Linear layers inside) was found; supported families: Llama, Qwen2 and models built like them"
        )
    return best


class _StopForward(Exception):
    pass


def capture_block_inputs(model: nn.Module, stack: DecoderStack, batches: list[torch.Tensor]):
    """Run the model up to the first block for each batch: hidden states and the block's keyword args."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = stack.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise UnsupportedModelError(f"{type(model).__name__}: its forward never reached {stack.prefix}.0")
    return captured


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def shared_input_groups(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Names of the block's linears grouped by the input tensor they receive (q/k/v, gate/up, ...)."""
    seen: OrderedDict[int, list[str]] = OrderedDict()
    keep_alive = []
    handles = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):

            def hook(_m, args, _name=name):
                keep_alive.append(args[0])
                seen.setdefault(id(args[0]), []).append(_name)

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run_block(block, hidden[:1], _slice_batch(kwargs, 1))
    finally:
        for handle in handles:
            handle.remove()
    groups = list(seen.values())
    if not groups:
        raise UnsupportedModelError(f"{type(block).__name__}: no nn.Linear was called in the block's forward")
    return groups


def _slice_batch(kwargs: dict, n: int) -> dict:
    """Cut batch-sized tensors in the block kwargs down to the first n rows (structure probing only)."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > n:
            out[key] = value[:n]
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            out[key] = tuple(v[:n] if v.dim() > 0 and v.shape[0] > n else v for v in value)
        else:
            out[key] = value
    return out
