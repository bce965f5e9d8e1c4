"""The source model, materialized one decoder block at a time so memory stays bounded by one block.

The model is built on the meta device; embeddings, final norm and head are read from the safetensors files
at once, each decoder block only when the pipeline reaches it, and released after it is quantized. Checkpoints
whose tensor names differ from the model's (or models with state the files do not hold) are loaded whole
instead, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from offline.model_structure import DecoderStack, UnsupportedModelError, find_decoder_stack
from vllm_aser.format import read_tensor_headers

logger = logging.getLogger("offline.source_model")


class SourceCheckpoint:
    """The tensors of a Hugging Face directory's safetensors files by name, read on demand."""

    def __init__(self, model_dir: Path):
        self.files = {name: file for name, (_, _, file) in read_tensor_headers(model_dir).items()}

    def load_into(self, module: nn.Module, prefix: str, skip: set[str] = frozenset()) -> None:
        """Copy `prefix + name` into every persistent tensor of `module` (cast to the module's dtype)."""
        state = module.state_dict()
        by_file: dict[Path, list[str]] = {}
        for name in state:
            if prefix + name in skip:
                continue
            by_file.setdefault(self.files[prefix + name], []).append(name)
        with torch.no_grad():
            for file, names in by_file.items():
                with safe_open(file, framework="pt") as fh:
                    for name in names:
                        tensor = fh.get_tensor(prefix + name)
                        if tensor.shape != state[name].shape:
                            raise UnsupportedModelError(
                                f"{prefix + name}: shape {tuple(tensor.shape)} in the checkpoint, "
                                f"{tuple(state[name].shape)} in the model built from config.json"
                            )
                        state[name].copy_(tensor)


@dataclass
class SourceModel:
    model: nn.Module
    stack: DecoderStack
    checkpoint: SourceCheckpoint | None  # None: loaded whole, blocks are already materialized

    def materialize_block(self, index: int) -> nn.Module:
        block = self.stack.layers[index]
        if self.checkpoint is not None:
            block.to_empty(device="cpu")
            self.checkpoint.load_into(block, f"{self.stack.prefix}.{index}.")
        return block

    def release_block(self, index: int) -> None:
        if self.checkpoint is not None:
            self.stack.layers[index].to("meta")


def _tied_head(model: nn.Module) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()


def _rebuild_buffers(module: nn.Module, config) -> bool:
    """Recompute non-persistent buffers (rotary inv_freq) that meta construction left empty."""
    for child in module.modules():
        if not any(True for _ in child.buffers(recurse=False)):
            continue
        persistent = set(child.state_dict(keep_vars=True).keys())
        lost = [n for n, _ in child.named_buffers(recurse=False) if n not in persistent]
        if not lost:
            continue
        try:
            fresh = type(child)(config=config)
        except TypeError:
            return False
        for name in lost:
            setattr(child, name, getattr(fresh, name))
        for name, value in list(vars(child).items()):  # plain tensor attributes (e.g. original_inv_freq)
            if isinstance(value, torch.Tensor) and value.is_meta:
                setattr(child, name, getattr(fresh, name))
    return True


def open_source_model(model_dir: Path):
    """(tokenizer, SourceModel) in float32, decoder blocks materialized on demand when the files allow it."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except (ValueError, KeyError, OSError) as exc:
        raise UnsupportedModelError(f"transformers could not load {model_dir} as a causal LM: {exc}") from exc
    model.eval()
    stack = find_decoder_stack(model)
    try:
        checkpoint = SourceCheckpoint(model_dir)
    except ValueError:  # no safetensors files (e.g. a .bin checkpoint)
        checkpoint = None
    needed = set(model.state_dict()) - _tied_head(model)
    block_has_lost_buffers = any(
        n not in stack.layers[0].state_dict() for n, _ in stack.layers[0].named_buffers()
    )
    reason = ("no safetensors files" if checkpoint is None
              else "tensor names differ from the model's" if needed - checkpoint.files.keys()
              else "its decoder blocks hold non-persistent buffers" if block_has_lost_buffers else None)
    if reason:
        logger.warning("%s: %s; loading it whole (memory not bounded by one block)", model_dir, reason)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        return tokenizer, SourceModel(model, find_decoder_stack(model), None)

    # everything outside the decoder stack: materialize and load now (embeddings, final norm, head, rotary)
    parent_name, _, child_name = stack.prefix.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, nn.ModuleList())
    try:
        model.to_empty(device="cpu")
        checkpoint.load_into(model, "", skip=_tied_head(model))  # a tied head is tied again below
        if not _rebuild_buffers(model, config):
            raise UnsupportedModelError(f"{type(model).__name__}: cannot rebuild its non-persistent buffers")
    finally:
        setattr(parent, child_name, stack.layers)
    if _tied_head(model):
        model.tie_weights()
    return tokenizer, SourceModel(model, stack, checkpoint)
