"""The plugin's QuantizationConfig against vLLM's own model classes (no engine): names vLLM renames."""

from __future__ import annotations

import pytest

from vllm_aser import format as fmt

pytestmark = pytest.mark.vllm


def _spec() -> fmt.ASERQuantConfig:
    ranks = {f"model.language_model.layers.0.{m}": r for m, r in
             [("self_attn.q_proj", 8), ("self_attn.k_proj", 8), ("self_attn.v_proj", 8), ("mlp.down_proj", 4)]}
    ranks["lm_head"] = 16
    return fmt.ASERQuantConfig(ranks=ranks, input_hadamard={"model.language_model.layers.0.mlp.down_proj": 64},
                               ignore=["lm_head", "model.vision_tower.blocks.0.proj"],
                               format_version=fmt.ROTATED_INPUT_FORMAT_VERSION)


def test_apply_vllm_mapper_follows_vllms_renames_of_a_real_model():
    """Gemma 4's text-only class reads checkpoints saved from the multimodal wrapper and moves the text stack
    (`model.language_model.` -> `model.`, vision/audio towers dropped): after vLLM hands the plugin that mapper,
    the ranks, the rotation and the ignore list are found under the names the engine's layers carry, and the
    fused q/k/v still resolves. A name the mapper drops keeps its own."""
    from vllm.model_executor.models.gemma4 import Gemma4ForCausalLM

    from vllm_aser.config import ASERConfig

    config = ASERConfig(_spec())
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    config.apply_vllm_mapper(Gemma4ForCausalLM.hf_to_vllm_mapper.get_rename_mapper())
    spec = config.spec
    qkv = config._sub_layer_names("model.layers.0.self_attn.qkv_proj")
    assert [spec.rank_of(n) for n in qkv] == [8, 8, 8]
    assert spec.hadamard_of("model.layers.0.mlp.down_proj") == 64
    assert spec.rank_of("lm_head") == 16
    assert spec.ignore == ["lm_head", "model.vision_tower.blocks.0.proj"]
    with pytest.raises(fmt.FormatError, match="no entry"):
        spec.rank_of("model.language_model.layers.0.mlp.down_proj")  # the checkpoint's name is gone


def test_renamed_keeps_a_name_the_mapper_drops():
    spec = _spec().renamed(lambda name: None if name.startswith("lm_head") else name.replace("model.", "m.", 1))
    assert "lm_head" in spec.ranks and "m.language_model.layers.0.mlp.down_proj" in spec.ranks
