"""The compressed-tensors baselines of the throughput comparison (`--export compressed-tensors`): vLLM's in-tree
support loads them and computes what we say they are (W8A8: int8 per-channel weights, dynamic per-token int8
activations; W4A16: int4 group weights, unquantized activations)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vllm_aser_offline.evaluate.simulate import ReferenceASERLinear, set_submodule
from tests.conftest import quantize
from tests.test_vllm_engine import run_vllm
from tests.tiny_models import build_tiny_model
from vllm_aser.kernels.reference import dequantize_weight, unpack_int

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def tiny_llama_32(workdir) -> Path:
    """Every linear's input size a multiple of 32: vLLM's CPU W4A16 kernel needs it."""
    return build_tiny_model(workdir / "llama-32", "llama", seed=2, intermediate=320)


def simulated(ct_dir: Path, source_dir: Path, act_bits: int) -> torch.nn.Module:
    """The source model with each linear replaced by the checkpoint's dequantized weight (float32 math)."""
    from transformers import AutoModelForCausalLM

    scheme = json.loads((ct_dir / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    group = scheme["weights"].get("group_size") or -1
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    with safe_open(ct_dir / "model.safetensors", framework="pt") as fh:
        names = {k.rsplit(".", 1)[0] for k in fh.keys() if k.endswith(".weight_scale")}
        for name in names:
            scale = fh.get_tensor(f"{name}.weight_scale").float()
            if f"{name}.weight_packed" in fh.keys():
                shape = fh.get_tensor(f"{name}.weight_shape").tolist()
                q = unpack_int(fh.get_tensor(f"{name}.weight_packed"), 4, shape[1])
            else:
                q = fh.get_tensor(f"{name}.weight")
            weight = dequantize_weight(q, scale, group)
            set_submodule(model, name, ReferenceASERLinear(weight, torch.ones(weight.shape[1]), None, None, None,
                                                           act_bits))
    return model


def _vllm_cpu_op_missing(op: str) -> str | None:
    """Why vLLM's CPU build cannot run `op` here (its AVX2 library lacks the weight-only int4 GEMM), or None."""
    import vllm._custom_ops  # noqa: F401  (loads the library vLLM picks for this CPU into torch.ops._C)

    if hasattr(torch.ops._C, op):
        return None
    isa = "AVX-512" if torch.cpu._is_avx512_supported() else "AVX2 only"
    return f"vLLM's CPU build has no {op} on this CPU ({isa}: vLLM loads its _C_AVX2 library, which lacks it)"


@pytest.mark.parametrize("w_bits,a_bits,group", [(8, 8, -1), (4, 16, 32)])
def test_compressed_tensors_baseline_matches_its_simulation(w_bits, a_bits, group, tiny_llama_32, calib_text,
                                                           workdir, cpu_env):
    if w_bits == 4 and (missing := _vllm_cpu_op_missing("cpu_gemm_wna16")):
        pytest.skip(missing)  # vLLM's own kernel, not ours: nothing of the plugin is left untested by this skip
    ct_dir = quantize(tiny_llama_32, workdir / f"llama-ct-w{w_bits}a{a_bits}", calib_text, method="rtn",
                      w_bits=w_bits, a_bits=a_bits, group_size=group, export="compressed-tensors", dtype="bfloat16")
    config = json.loads((ct_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == ("int-quantized" if w_bits == 8 else "pack-quantized")
    model = simulated(ct_dir, tiny_llama_32, a_bits)
    # vLLM's CPU int8 GEMM takes bf16/fp16 activations only: compare like the bf16 ASER test (0.1 nats)
    results = run_vllm(cpu_env, model=str(ct_dir), dtype="bfloat16", quantization="compressed-tensors")
    for result in results:
        sequence = torch.tensor([result["prompt_ids"] + result["ids"]])
        with torch.no_grad():
            logits = model(sequence).logits[0, len(result["prompt_ids"]) - 1 : -1]
        ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(result["ids"])[:, None])[:, 0]
        assert max(abs(a - b) for a, b in zip(result["logprobs"], ref.tolist())) < 0.1

