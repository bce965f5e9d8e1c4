"""A Llama-shaped model of about 1B parameters with random weights, for throughput only (the GEMM shapes of a
real deployment; the values do not change the speed). Shapes follow Llama-3.2-1B with SmolLM2's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

CONFIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
              num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True)


def build_random_llama(target: Path, tokenizer_source: Path, seed: int = 0) -> Path:
    """Written once (bf16 safetensors, ~2.4 GB) and reused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return save_random_model(target, tokenizer_source, lambda tok: LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **CONFIG)), seed)


def save_random_model(target: Path, tokenizer_source: Path, make_model, seed: int = 0) -> Path:
    """make_model(tokenizer) under a fixed seed, saved in bf16 with the tokenizer; written once, atomically."""
    if (target / "config.json").exists():
        return target
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    torch.manual_seed(seed)
    model = make_model(tokenizer).to(torch.bfloat16)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def write_random_text(path: Path, model_dir: Path, words: int = 60000, seed: int = 0) -> Path:
    """Calibration text of random tokens (the model is random too)."""
    if path.exists():
        return path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, len(tokenizer), (words,), generator=g).tolist()
    path.write_text(tokenizer.decode(ids, skip_special_tokens=True))
    return path
