"""A Qwen3-MoE-shaped model with random weights, for throughput only: 8 blocks of 32 experts (top 8, expert
width 384) around a 1024-wide residual stream, about 0.37B parameters of which 0.1B are active per token
(the proportions of Qwen3-30B-A3B, scaled down to fit a 2-core machine), with SmolLM2's tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from harness.random_llama import save_random_model  # benchmarks/ is on sys.path

CONFIG = dict(hidden_size=1024, intermediate_size=3072, moe_intermediate_size=384, num_experts=32,
              num_experts_per_tok=8, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
              head_dim=64, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
              tie_word_embeddings=True, norm_topk_prob=True)


def build_random_qwen3_moe(target: Path, tokenizer_source: Path, seed: int = 0) -> Path:
    """Written once (bf16 safetensors, ~0.75 GB) and reused."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    def make_model(tokenizer):
        config = Qwen3MoeConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, **CONFIG)
        model = Qwen3MoeForCausalLM(config)
        with torch.no_grad():  # transformers leaves fused expert parameters uninitialized outside from_pretrained
            for name, param in model.named_parameters():
                if "experts" in name:
                    param.normal_(0.0, config.initializer_range)
        return model

    return save_random_model(target, tokenizer_source, make_model, seed)
