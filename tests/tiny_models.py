"""Tiny Llama and Qwen2 models built locally (random weights, a BPE tokenizer trained here)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be has had "
    "river city music history king war people time year world water light north south old new small great "
    "church school family house garden market road bridge island mountain forest village station train "
    "paper letter story song dance night morning winter summer spring autumn red blue green black white"
).split()


def english_like_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    sentences, words = [], 0
    while words < n_words:
        length = rng.randint(6, 18)
        sentence = " ".join(rng.choice(WORDS) for _ in range(length))
        sentences.append(sentence.capitalize() + rng.choice([".", ".", ".", "?", "!"]))
        words += length
    return " ".join(sentences)


def train_tokenizer(directory: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([english_like_text(20000, seed=1)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    fast.save_pretrained(directory)
    return fast


def build_tiny_model(
    directory: Path,
    family: str = "llama",
    seed: int = 0,
    hidden: int = 128,
    intermediate: int | None = None,
    tie_embeddings: bool = False,
) -> Path:
    """A random-weight causal LM of the given family with a locally trained tokenizer, in float32. Tied
    embeddings come with a non-unit final norm weight (a rotation must then untie the head)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(directory)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        # default: not a multiple of 16 per TP=2 shard, nor of 128
        intermediate_size=intermediate or hidden * 2 + 48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_embeddings,
    )
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(family)
    with torch.no_grad():  # a few large input channels, like real LLM activations
        for layer in model.model.layers:
            layer.input_layernorm.weight[:3] = 8.0
            layer.post_attention_layernorm.weight[5:7] = 6.0
        if tie_embeddings:
            model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory


def write_calibration_text(path: Path, n_words: int = 30000, seed: int = 7) -> Path:
    path.write_text(english_like_text(n_words, seed))
    return path


# transformers model types of the families built by build_family_model (beyond Llama/Qwen2); all but Gemma 3 (sandwich
# norms) are rotated by --rotate auto
FAMILIES = ("qwen3", "mistral", "gemma3_text", "phi3", "qwen3_moe", "mixtral")
ROTATABLE_FAMILIES = ("qwen3", "mistral", "phi3", "qwen3_moe", "mixtral")


def build_family_model(directory: Path, family: str, seed: int = 0) -> Path:
    """A random-weight model of a transformers family from its own config class (AutoConfig.for_model), as a
    new user would bring it: Qwen3 (q/k norms), Mistral, Gemma 3 (sandwich norms, sliding-window layers), Phi-3 (fused qkv/gate_up in
    the checkpoint), Qwen3-MoE and Mixtral (experts fused in transformers, per expert in the checkpoint)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(directory)
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=304, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.eos_token_id)
    if family in ("qwen3_moe", "mixtral"):  # 4 experts, top 2; expert width 96 splits over TP=2 in int4 packing
        kwargs.update(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96)
    if family == "gemma3_text":  # layer 0 sliding-window, layer 1 global
        kwargs.update(head_dim=32, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    if family in ("qwen3", "qwen3_moe"):
        kwargs.update(head_dim=32)
    if family == "qwen3_moe":
        kwargs.update(decoder_sparse_step=1, mlp_only_layers=[])
    if family == "mixtral":
        kwargs.update(intermediate_size=96)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kwargs))
    with torch.no_grad():  # random norms (Gemma's init is zeros, i.e. unit gain): a real model's are not flat
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.uniform_(-0.5, 0.5) if family == "gemma3_text" else param.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    return directory
