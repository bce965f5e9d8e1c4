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


class _KwargsRecorder(nn.Module):
    """Stands in for one decoder block during capture: records the block's input and keyword arguments
    (attention mask, rotary embeddings: they differ per block in models that mix sliding-window and global
    attention, like Gemma 3) and passes the hidden states through unchanged."""

    def __init__(self, block: nn.Module, record):
        super().__init__()
        self.record = record
        object.__setattr__(self, "_block", block)  # not a submodule: attribute reads only

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.record(hidden, kwargs)
        return hidden


class _StopForward(Exception):
    """Raised after the last block's arguments are recorded: the final norm and the head need not run."""


@dataclass
class BlockInputs:
    hidden: list[torch.Tensor]  # the first block's input, one tensor per calibration batch
    kwargs: list[list[dict]]  # [block][batch]: the keyword arguments the model passes each block

    def for_block(self, index: int, hidden: list[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, dict]]:
        return list(zip(hidden if hidden is not None else self.hidden, self.kwargs[index]))


def capture_block_inputs(model: nn.Module, stack: DecoderStack, batches: list[torch.Tensor]) -> BlockInputs:
    """Run the model with every block replaced by a recorder: the first block's hidden states per batch and
    each block's own keyword arguments (no block is computed, so none needs to be materialized)."""
    hidden: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in stack.layers]

    def recorder(index):
        def record(h, kw):
            if index == 0:
                hidden.append(h.detach())
            kwargs[index].append({k: v for k, v in kw.items() if k != "hidden_states"})
            if index == len(stack.layers) - 1:
                raise _StopForward
        return record

    parent_name, _, child = stack.prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.ModuleList(_KwargsRecorder(b, recorder(i)) for i, b in enumerate(stack.layers)))
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        setattr(parent, child, stack.layers)
    if len(hidden) != len(batches) or any(len(k) != len(batches) for k in kwargs):
        raise UnsupportedModelError(f"{type(model).__name__}: its forward did not call every block of {stack.prefix}")
    return BlockInputs(hidden, kwargs)


class InputHooks:
    """Call fn(group key, input tensor) for the first linear of every shared-input group while active."""

    def __init__(self, block, groups: list[list[str]], fn):
        self.block, self.groups, self.fn = block, groups, fn

    def __enter__(self):
        self.handles = [
            self.block.get_submodule(g[0]).register_forward_pre_hook(
                lambda _m, args, key=tuple(g): self.fn(key, args[0]))
            for g in self.groups
        ]

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def shared_input_groups(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> list[list[str]]:
    """Names of the block's linears grouped by the input tensor they receive (q/k/v, gate/up, ...)."""
    from vllm_aser_offline.model.experts import UnfusedExperts

    seen: OrderedDict[int, list[str]] = OrderedDict()
    keep_alive = []
    handles = []
    # experts declare their groups: a probe batch routes tokens to only some of them
    declared = [g for n, m in block.named_modules() if isinstance(m, UnfusedExperts) for g in m.groups(n)]
    declared_names = {n for g in declared for n in g}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) and name not in declared_names:

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
    groups = list(seen.values()) + declared
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


def check_block_weights(block: nn.Module, where: str) -> list[dict]:
    """The block's weights that stay in full precision besides norms (MoE routers), with the reason; any other
    weight outside an nn.Linear is refused by name, so that nothing is left unquantized in silence."""
    from vllm_aser_offline.model.experts import UnfusedExperts

    modules = dict(block.named_modules())
    kept = []
    for name, param in block.named_parameters():
        owner_name = name.rpartition(".")[0]
        owner = modules[owner_name]
        if isinstance(owner, nn.Linear) or param.dim() < 2:
            continue
        parent = modules[owner_name.rpartition(".")[0]]
        experts = [m for m in parent.children() if isinstance(m, UnfusedExperts)]
        if experts and param.shape[0] == experts[0].num_experts:
            kept.append({"name": f"{where}.{name}", "module": owner_name, "shape": list(param.shape),
                         "reason": "MoE router: kept in full precision, as vLLM runs it"})
            continue
        raise UnsupportedModelError(
            f"{where}.{name}: a {param.dim()}-D weight {list(param.shape)} held by {type(owner).__name__}, which "
            "is not an nn.Linear; aser-quantize cannot quantize it and does not leave weights in full precision "
            "silently, so this model family is not supported yet (supported: Llama, Qwen2/3, Mistral, Gemma 3, "
            "Phi-3, Qwen3-MoE, Mixtral and models built like them)"
        )
    return kept
