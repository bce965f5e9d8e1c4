"""Families beyond Llama/Qwen2 (issue 19): Gemma 3, Phi-3 (pre-fused checkpoint), Qwen3-MoE and Mixtral.

Each is a tiny random model built from transformers' own config class, quantized with the defaults (rotation
auto), every decoder weight accounted for in the report, and served by vLLM against the torch reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import quantize
from safetensors import safe_open
from tiny_models import FAMILIES, ROTATABLE_FAMILIES, build_family_model

from vllm_aser_offline.model.experts import UnfusedExperts
from vllm_aser_offline.model.model_structure import UnsupportedModelError, check_block_weights
from vllm_aser import format as fmt


@pytest.fixture(scope="session")
def family_models(workdir) -> dict[str, Path]:
    return {family: build_family_model(workdir / f"src-{family}", family) for family in FAMILIES}


@pytest.fixture(scope="session")
def family_artifacts(workdir, family_models, calib_text) -> dict[str, Path]:
    return {family: quantize(src, workdir / f"aser-{family}", calib_text, rotate="auto", dtype="float32")
            for family, src in family_models.items()}


def _report(artifact: Path) -> dict:
    return json.loads((artifact / fmt.REPORT_FILENAME).read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_decoder_weight_is_quantized_or_listed(family, family_models, family_artifacts):
    with safe_open(family_models[family] / "model.safetensors", "pt") as fh:
        source = {k[: -len(".weight")] for k in fh.keys() if ".layers." in k and len(fh.get_slice(k).get_shape()) >= 2}
    report = _report(family_artifacts[family])
    quantized = {layer["name"] for layer in report["layers"]}
    kept = {e["name"].replace("*", name.split(".")[2])[: -len(".weight")]
            for e in report["unquantized"] for name in source}
    assert source == quantized | (kept & source), sorted(source - quantized - kept)
    with safe_open(family_artifacts[family] / "model.safetensors", "pt") as fh:
        names = set(fh.keys())
    assert all(f"{n}.{fmt.WEIGHT_PACKED}" in names for n in quantized)  # under the checkpoint's own names
    cfg = fmt.read_quant_config(family_artifacts[family])
    assert set(cfg.ranks) == quantized
    if family in ("qwen3_moe", "mixtral"):
        experts = [n for n in quantized if ".experts." in n]
        assert len(experts) == 2 * 4 * 3  # 2 blocks x 4 experts x gate/up/down
        assert [e["reason"].startswith("MoE router") for e in report["unquantized"]] == [True]
        assert report["moe"]["starved_experts"] == []
        routers = [n for n in cfg.ignore if n.endswith(".gate")]
        assert len(routers) == 2  # vLLM builds the router with the quantization config: ignored by name
    else:
        assert report["unquantized"] == [] and report["moe"] is None


def test_each_block_is_calibrated_with_its_own_attention_arguments(family_models):
    """Gemma 3's layer 0 is sliding-window and layer 1 global: different rotary tables (and masks) per block."""
    from vllm_aser_offline.model.model_structure import capture_block_inputs, find_decoder_stack
    from vllm_aser_offline.model.source_model import open_source_model

    _, source = open_source_model(family_models["gemma3_text"])
    captured = capture_block_inputs(source.model, source.stack, [torch.arange(40).reshape(2, 20)])
    local, full = (captured.kwargs[i][0]["position_embeddings"] for i in (0, 1))
    assert len(captured.hidden) == 1 and captured.hidden[0].shape == (2, 20, 128)
    assert not torch.allclose(local[0], full[0])  # rope_local_base_freq 10000 vs rope_theta 1e6
    assert find_decoder_stack(source.model).layers is source.stack.layers  # the recorders were removed


def test_rotation_auto_applies_where_the_structure_allows(family_artifacts):
    for family in FAMILIES:  # Gemma's sandwich norms do not commute with a rotation: not rotated, and said so
        provenance = _report(family_artifacts[family])["provenance"]
        if family in ROTATABLE_FAMILIES:
            assert provenance["rotation"]["kind"] == "hadamard" and provenance["rotation_refused"] is None
        else:
            assert provenance["rotation"] is None and "--rotate none" in provenance["rotation_refused"], family
    gemma = _report(family_artifacts["gemma3_text"])["provenance"]["rotation_refused"]
    assert "pre_feedforward_layernorm" in gemma


@pytest.mark.parametrize("family", ["phi3", "qwen3_moe", "mixtral"])
def test_rotation_preserves_fused_and_moe_models(family, family_models):
    """Phi-3's fused qkv (values in its last rows) and gate_up; MoE routers, every expert's gate/up and down."""
    from transformers import AutoModelForCausalLM

    from vllm_aser_offline.model.experts import unfuse_stack_experts
    from vllm_aser_offline.model.model_structure import find_decoder_stack
    from vllm_aser_offline.transform.rotation import check_rotatable, head_dim, residual_rotation, rotate_block, rotate_outside
    from vllm_aser_offline.model.source_model import checkpoint_naming

    model = AutoModelForCausalLM.from_pretrained(family_models[family], dtype=torch.float32).eval()
    stack = find_decoder_stack(model)
    with safe_open(family_models[family] / "model.safetensors", "pt") as fh:
        unfuse_stack_experts(stack, checkpoint_naming(model), list(fh.keys()))
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        check_rotatable(model, stack)
        rotation = residual_rotation(model.config.hidden_size, 0, head_dim(stack.layers[0]))
        rotate_outside(model, stack, rotation)
        for i, block in enumerate(stack.layers):
            rotate_block(block, f"{stack.prefix}.{i}", rotation)
        after = model(ids).logits
    # a router left unrotated would pick other experts, a missed v slice would change the attention output
    assert float((after - before).norm() / before.norm()) < 1e-5


def test_explicit_hadamard_on_gemma_is_refused(family_models, calib_text, tmp_path):
    with pytest.raises(UnsupportedModelError, match="sandwich"):
        quantize(family_models["gemma3_text"], tmp_path / "out", calib_text, rotate="hadamard")
    assert not (tmp_path / "out").exists()


def test_unfused_experts_compute_the_fused_forward(family_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_models["qwen3_moe"], dtype=torch.float32)
    fused = model.model.layers[0].mlp.experts
    unfused = UnfusedExperts(fused, {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(33, 128, generator=gen)
    index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(33)])
    index[:, :] = index.clamp(max=2)  # expert 3 gets no token
    weights = torch.rand(33, 2, generator=gen)
    expected = fused(x, index, weights)
    torch.testing.assert_close(unfused(x, index, weights), expected, rtol=1e-5, atol=1e-6)
    unfused.calibrate_on_all = {0, 3}  # every token through experts 0 and 3; their outputs still use only routed rows
    torch.testing.assert_close(unfused(x, index, weights), expected, rtol=1e-5, atol=1e-6)
    assert [g[0].split(".")[1] for g in unfused.groups("experts")] == ["0", "0", "1", "1", "2", "2", "3", "3"]


def test_starved_experts_are_calibrated_on_all_tokens_and_reported(family_models, calib_text, tmp_path, capsys):
    from vllm_aser_offline.cli import main

    out = tmp_path / "starved"
    assert main([str(family_models["mixtral"]), str(out), "--calib", str(calib_text), "--num-samples", "4",
                 "--seq-len", "64", "--rank", "8", "--moe-min-tokens", "100000", "--quiet"]) == 0
    moe = _report(out)["moe"]
    starved = moe["starved_experts"]
    assert len(starved) == 8 and moe["min_routed_tokens"] == 100000
    assert starved[0]["expert"] == "model.layers.0.block_sparse_moe.experts.0"
    assert sum(s["routed_tokens"] for s in starved[:4]) == 4 * 64 * 2  # top-2 routing of 256 tokens in block 0
    err = capsys.readouterr().err
    assert "8 expert(s) saw fewer than 100000" in err and "kept in full precision: model.layers.*.block_sparse_moe" in err
    from vllm_aser_offline.export.report_summary import main as report_main

    assert report_main([str(out)]) == 0
    summary = capsys.readouterr().out
    assert "MoE: 8 expert(s) routed fewer than 100000" in summary and "rotation: hadamard" in summary
    assert "kept in full precision: model.layers.*.block_sparse_moe.gate.weight [4, 128] (MoE router" in summary


def test_unknown_weights_in_a_block_are_refused_by_name(tiny_llama):
    from transformers import AutoModelForCausalLM

    block = AutoModelForCausalLM.from_pretrained(tiny_llama).model.layers[0]
    assert check_block_weights(block, "model.layers.*") == []
    block.mlp.register_parameter("mixer", torch.nn.Parameter(torch.zeros(3, 8, 8)))
    with pytest.raises(UnsupportedModelError, match=r"model.layers.\*.mlp.mixer: a 3-D weight .* not an nn.Linear"):
        check_block_weights(block, "model.layers.*")


# vLLM against the reference. The reference kernel's integers are the native kernel's, so tokens must match; the
# logprobs move only where vLLM's float32 attention/norm order flips an int8 rounding. Measured on these fixtures
# (AMD EPYC, AVX-512 VNNI): Gemma 3 4.8e-3, the others 4.8e-7; Mixtral built with another seed reached 2.7e-3.
@pytest.mark.vllm
@pytest.mark.parametrize("family,tolerance", [("qwen3", 1e-3), ("mistral", 1e-3), ("gemma3_text", 2e-2),
                                              ("phi3", 1e-3), ("qwen3_moe", 1e-3), ("mixtral", 1e-2)])
def test_vllm_serves_the_family_like_the_reference(family, tolerance, family_artifacts, cpu_env):
    from test_vllm_engine import reference_logprobs, run_vllm

    model_dir = family_artifacts[family]
    moe = family in ("qwen3_moe", "mixtral")  # their experts: one native call per layer (all experts stacked)
    results = run_vllm(dict(cpu_env, VLLM_ASER_KERNEL="cpu"), model=str(model_dir), dtype="float32",
                       expect_log="ASER cpu kernel: grouped MoE path for" if moe else "ASER cpu kernel: native path")
    for result in results:
        greedy, ref = reference_logprobs(model_dir, result["prompt_ids"], result["ids"])
        assert result["ids"] == greedy
        assert max(abs(a - b) for a, b in zip(result["logprobs"], ref)) < tolerance


@pytest.mark.vllm
def test_moe_per_expert_calls_match_the_grouped_call(family_artifacts, cpu_env):
    """VLLM_ASER_MOE_PER_EXPERT=1 runs each expert as its own native call (the path before grouping): the same
    tokens, and logprobs equal up to float32 summation order (the grouped call accumulates the experts in float32)."""
    from test_vllm_engine import run_vllm

    model_dir, env = str(family_artifacts["qwen3_moe"]), dict(cpu_env, VLLM_ASER_KERNEL="cpu")
    grouped = run_vllm(env, model=model_dir, dtype="float32", expect_log="ASER cpu kernel: grouped MoE path for")
    per_expert = run_vllm(dict(env, VLLM_ASER_MOE_PER_EXPERT="1"), model=model_dir, dtype="float32",
                          expect_log="per-expert MoE path for")
    for a, b in zip(grouped, per_expert, strict=True):
        assert a["ids"] == b["ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4


@pytest.mark.vllm
def test_moe_tensor_parallel_2_matches_tp1(family_artifacts, cpu_env):
    """The experts' intermediate size splits over the ranks (w13 rows, w2 columns), as in vLLM's FusedMoE."""
    from test_vllm_engine import assert_tp2_matches_tp1

    assert_tp2_matches_tp1(family_artifacts["qwen3_moe"], cpu_env)


def test_moe_min_tokens_zero_keeps_every_expert_on_its_routed_tokens(family_models, calib_text, tmp_path):
    out = quantize(family_models["mixtral"], tmp_path / "out", calib_text, rank=8, moe_min_tokens=0)
    assert _report(out)["moe"]["starved_experts"] == [] and _report(out)["moe"]["min_routed_tokens"] == 0
