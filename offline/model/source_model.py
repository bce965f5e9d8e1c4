"""The source model, materialized one decoder block at a time so memory stays bounded by one block.

The model is built with its parameters on the meta device (buffers such as rotary frequencies are computed
for real at construction); embeddings, final norm and head are read from the safetensors files at once, each
decoder block only when the pipeline reaches it, and released after it is quantized. MoE experts that
transformers fuses into 3-D parameters are unfused into per-expert linears under the checkpoint's own names
(offline/model/experts.py). Checkpoints whose tensor names differ from the model's are loaded whole instead, with
a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vllm_aser_offline.model.experts import unfuse_stack_experts
from vllm_aser_offline.model.model_structure import DecoderStack, UnsupportedModelError, find_decoder_stack
from vllm_aser.format import read_tensor_headers

logger = logging.getLogger("vllm_aser_offline.model.source_model")


class SourceCheckpoint:
    """The tensors of a Hugging Face directory's safetensors files by name, read on demand."""

    def __init__(self, model_dir: Path, checkpoint_name=lambda name: name):
        self.files = {name: file for name, (_, _, file) in read_tensor_headers(model_dir).items()}
        self.checkpoint_name = checkpoint_name  # the model's tensor name -> the file's

    def missing(self, names) -> list[str]:
        return sorted(n for n in names if self.checkpoint_name(n) not in self.files)

    def load_into(self, module: nn.Module, prefix: str, skip: set[str] = frozenset()) -> None:
        """Copy the checkpoint's tensor into every persistent tensor of `module` (cast to the module's dtype)."""
        state = module.state_dict()
        by_file: dict[Path, list[str]] = {}
        for name in state:
            if prefix + name in skip:
                continue
            by_file.setdefault(self.files[self.checkpoint_name(prefix + name)], []).append(name)
        with torch.no_grad():
            for file, names in by_file.items():
                with safe_open(file, framework="pt") as fh:
                    for name in names:
                        stored = self.checkpoint_name(prefix + name)
                        tensor = fh.get_tensor(stored)
                        if tensor.shape != state[name].shape:
                            raise UnsupportedModelError(
                                f"{stored}: shape {tuple(tensor.shape)} in the checkpoint, "
                                f"{tuple(state[name].shape)} in the model built from config.json"
                            )
                        state[name].copy_(tensor)


def _materialize(module: nn.Module) -> None:
    """Give every meta parameter and buffer real (uninitialized) CPU storage; tied parameters stay tied.
    Tensors that are already real (buffers computed at construction, e.g. rotary inv_freq) are kept."""
    memo: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=False)
                sub._parameters[name] = memo[id(param)]
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.is_meta:
                sub._buffers[name] = torch.empty_like(buf, device="cpu")


def _release(module: nn.Module) -> None:
    """Drop the parameters' storage (back to meta); buffers stay, so the block can be materialized again."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=False)


@dataclass
class SourceModel:
    model: nn.Module
    stack: DecoderStack
    checkpoint: SourceCheckpoint | None  # None: loaded whole, blocks are already materialized
    checkpoint_name: Callable[[str], str] = lambda name: name  # the model's tensor name -> the checkpoint's
    unfused_experts: list[str] = field(default_factory=list)  # expert collections unfused, in block 0

    def materialize_block(self, index: int) -> nn.Module:
        block = self.stack.layers[index]
        if self.checkpoint is not None:
            _materialize(block)
            self.checkpoint.load_into(block, f"{self.stack.prefix}.{index}.")
        return block

    def release_block(self, index: int) -> None:
        if self.checkpoint is not None:
            _release(self.stack.layers[index])


def _tied_head(model: nn.Module) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()


def checkpoint_naming(model: nn.Module) -> Callable[[str], str]:
    """transformers 5 renames some checkpoint keys when it loads them (Mixtral's block_sparse_moe -> mlp);
    this is the reverse, from its own conversion mapping, so tensors are read and written under the names
    the checkpoint (and vLLM) use."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # transformers 4: modules are named as the checkpoint
        return lambda name: name
    renamings = [
        c.reverse_transform() for c in get_model_conversion_mapping(model, add_legacy=False)[::-1]
        if isinstance(c, WeightRenaming)
    ]
    if not renamings:
        return lambda name: name
    return lambda name: rename_source_key(name, renamings, [], reverse=True)[0]


def open_source_model(model_dir: Path):
    """(tokenizer, SourceModel) in float32, decoder blocks materialized on demand when the files allow it."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary, scales) real
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModelError(f"transformers could not load {model_dir} as a causal LM: {exc}") from exc
    model.eval()
    stack = find_decoder_stack(model)
    checkpoint_name = checkpoint_naming(model)
    try:
        checkpoint = SourceCheckpoint(model_dir, checkpoint_name)
    except ValueError:  # no safetensors files (e.g. a .bin checkpoint)
        checkpoint = None
    unfused = unfuse_stack_experts(stack, checkpoint_name, None if checkpoint is None else list(checkpoint.files))
    missing = [] if checkpoint is None else checkpoint.missing(set(model.state_dict()) - _tied_head(model))
    if checkpoint is None or missing:
        reason = "no safetensors files" if checkpoint is None else (
            f"tensor names differ from the model's (e.g. {missing[0]})")
        logger.warning("%s: %s; loading it whole (memory not bounded by one block)", model_dir, reason)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        stack = find_decoder_stack(model)
        unfused = unfuse_stack_experts(stack, checkpoint_name, None if checkpoint is None else list(checkpoint.files))
        return tokenizer, SourceModel(model, stack, None, checkpoint_name, unfused)

    # everything outside the decoder stack: materialize and load now (embeddings, final norm, head)
    parent_name, _, child_name = stack.prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, nn.ModuleList())
    try:
        _materialize(model)
        checkpoint.load_into(model, "", skip=_tied_head(model))  # a tied head is tied again below
    finally:
        setattr(parent, child_name, stack.layers)
    if _tied_head(model):
        model.tie_weights()
    return tokenizer, SourceModel(model, stack, checkpoint, checkpoint_name, unfused)
