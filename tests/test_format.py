"""The artifact contract: config schema validation and checkpoint checks, without vLLM."""

from __future__ import annotations

import pytest
from artifact_edits import BROKEN, copy_artifact

from vllm_aser import format as fmt


def test_roundtrip_and_defaults():
    cfg = fmt.ASERQuantConfig(ranks={"a.q_proj": 8})
    again = fmt.ASERQuantConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.quant_method == "aser" and again.format_version == fmt.FORMAT_VERSION


@pytest.mark.parametrize(
    "change,message",
    [
        ({"quant_method": "gptq"}, "quant_method is 'gptq'"),
        ({"format_version": 3}, "format_version 3 is not supported"),
        ({"weight_bits": 3}, "weight_bits must be 4 or 8"),
        ({"weight_group_size": 100}, "weight_group_size"),
        ({"activation_bits": 9}, "activation_bits"),
        ({"lowrank_dtype": "int8"}, "lowrank_dtype"),
        ({"ranks": {"m": -1}}, "ranks['m']"),
        ({"foo": 1}, "unknown field(s) ['foo']"),
    ],
)
def test_bad_config_names_the_field(change, message):
    raw = {**fmt.ASERQuantConfig().to_dict(), **change}
    with pytest.raises(fmt.FormatError) as err:
        fmt.ASERQuantConfig.from_dict(raw)
    assert message in str(err.value)


def test_missing_version_field():
    raw = fmt.ASERQuantConfig().to_dict()
    del raw["format_version"]
    with pytest.raises(fmt.FormatError, match="no 'format_version'"):
        fmt.ASERQuantConfig.from_dict(raw)


def test_expected_shapes():
    cfg = fmt.ASERQuantConfig(weight_group_size=64)
    shapes = fmt.expected_shapes(cfg, out_features=10, in_features=130, rank=8)
    assert shapes[fmt.WEIGHT_PACKED] == (10, 17)  # ceil(130 / 8)
    assert shapes[fmt.WEIGHT_SCALE] == (10, 3)  # ceil(130 / 64)
    assert shapes[fmt.LOWRANK_DOWN] == (8, 130) and shapes[fmt.LOWRANK_UP] == (10, 8)
    assert fmt.LOWRANK_DOWN not in fmt.expected_shapes(cfg, 10, 130, rank=0)


def test_written_artifact_validates(llama_aser_fp32):
    fmt.validate_checkpoint(llama_aser_fp32)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_artifacts_are_named(case, llama_aser_fp32, tmp_path):
    break_it, message = BROKEN[case]
    model_dir = copy_artifact(llama_aser_fp32, tmp_path / case)
    break_it(model_dir)
    with pytest.raises(fmt.FormatError) as err:
        fmt.validate_checkpoint(model_dir)
    assert message in str(err.value)
