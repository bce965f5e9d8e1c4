"""--mlp-hadamard: down_proj's input rotated at run time by block-diagonal Walsh-Hadamard transforms (R4)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quantize

from vllm_aser_offline.transform.mlp_rotation import mlp_hadamard_block, rotate_mlp_inner, why_not_rotatable
from vllm_aser_offline.model.model_structure import UnsupportedModelError
from vllm_aser_offline.options import OptionsError, QuantizeOptions
from vllm_aser_offline.evaluate.simulate import load_reference_model
from vllm_aser import format as fmt
from vllm_aser.kernels.hadamard import (
    block_hadamard,
    block_hadamard_unscaled,
    kronecker_factors,
    sylvester,
)


@pytest.mark.parametrize("order", [1, 2, 4, 8, 64, 512])
def test_sylvester_matrices_are_symmetric_hadamard_matrices(order):
    h = sylvester(order)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h, h.t())
    assert torch.equal(h @ h, order * torch.eye(order))


@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("block,width", [(2, 6), (16, 304), (64, 192), (128, 1536), (512, 1536)])
def test_block_hadamard_is_an_orthogonal_involution(rows, block, width):
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(block + rows), dtype=torch.float64)
    y = block_hadamard(x, block)
    torch.testing.assert_close(y.double().norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=0)
    torch.testing.assert_close(block_hadamard(y, block).double(), x, rtol=1e-5, atol=1e-5)
    # block-diagonal: each block only mixes its own features
    x2 = x.clone()
    x2[:, :block] = 0
    torch.testing.assert_close(block_hadamard(x2, block)[:, :block], torch.zeros(rows, block, dtype=torch.float32))


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("block,width", [(2, 6), (8, 24), (16, 304), (32, 96), (256, 768), (512, 1536)])
def test_kronecker_form_matches_the_oracle(rows, block, width, dtype, rtol):
    """What the plugin runs (two +-1 GEMMs in the activation dtype, 1/sqrt(b) left to the smoothing scale)."""
    x = torch.randn(2, rows, width, generator=torch.Generator().manual_seed(rows))
    left, right = kronecker_factors(block)
    assert left.shape[0] * right.shape[0] == block and left.shape[0] <= right.shape[0]
    got = block_hadamard_unscaled(x.to(dtype), left.to(dtype), right.to(dtype)).float() / block**0.5
    want = block_hadamard(x.to(dtype).float(), block)
    assert got.shape == x.shape
    err = float((got - want).norm() / want.norm())
    assert err < rtol, err


def test_blocks_that_do_not_divide_the_width_are_refused():
    with pytest.raises(ValueError, match="not a multiple of the Hadamard block 64"):
        block_hadamard(torch.zeros(3, 96), 64)
    with pytest.raises(ValueError, match="power of two"):
        kronecker_factors(24)


@pytest.mark.parametrize("width,requested,block", [(1536, "auto", 512), (14336, "auto", 512), (304, "auto", 16),
                                                   (96, "auto", 32), (11, "auto", 0), (1536, "none", 0),
                                                   (1536, "128", 128)])
def test_block_size_rule(width, requested, block):
    assert mlp_hadamard_block(width, requested) == block


def test_an_explicit_block_that_does_not_divide_the_mlp_is_refused():
    with pytest.raises(ValueError, match="inner width 304 is not a multiple"):
        mlp_hadamard_block(304, "32")


@pytest.mark.parametrize("value", ["3", "1", "0", "-8", "big"])
def test_option_values_are_checked(value):
    with pytest.raises(OptionsError, match="--mlp-hadamard must be auto, none or a power of two"):
        QuantizeOptions(mlp_hadamard=value)


def test_compressed_tensors_export_cannot_carry_an_online_rotation():
    with pytest.raises(OptionsError, match="only the ASER format"):
        QuantizeOptions(method="rtn", export="compressed-tensors", w_bits=8, mlp_hadamard="16")


def test_rotating_a_block_keeps_its_function(tiny_llama):
    from vllm_aser_offline.evaluate.perplexity import load_torch_model
    from vllm_aser_offline.model.model_structure import find_decoder_stack

    model = load_torch_model(tiny_llama, torch.float32)
    block = find_decoder_stack(model).layers[0]
    mlp = block.mlp
    x = torch.randn(3, 5, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = mlp(x)
        up_before = mlp.up_proj.weight.clone()
        assert rotate_mlp_inner(block, "model.layers.0", 16, torch.Generator().manual_seed(1)) == {
            "mlp.down_proj": 16}
        after = mlp(x)
    assert float((after - before).norm() / before.norm()) < 1e-5
    # the signs went into up_proj's rows (some flipped, none scaled)
    ratio = mlp.up_proj.weight[:, 0] / up_before[:, 0]
    assert set(ratio.round().tolist()) == {-1.0, 1.0}


@pytest.fixture(scope="module")
def phi3_and_moe(workdir) -> dict:
    from tiny_models import build_family_model

    return {family: build_family_model(workdir / f"src-{family}-r4", family) for family in ("phi3", "qwen3_moe")}


def test_moe_blocks_are_not_rotated(phi3_and_moe):
    from vllm_aser_offline.model.source_model import open_source_model

    _, source = open_source_model(phi3_and_moe["qwen3_moe"])
    assert "MoE experts" in why_not_rotatable(source.materialize_block(0))


def test_artifact_declares_the_rotation_and_the_reference_follows_the_model(llama_aser_mlp_rotated, tiny_llama):
    from vllm_aser_offline.evaluate.perplexity import load_torch_model

    cfg = fmt.read_quant_config(llama_aser_mlp_rotated)
    assert cfg.format_version == 2
    downs = sorted(n for n in cfg.ranks if n.endswith("down_proj"))
    assert cfg.input_hadamard == {n: 16 for n in downs} and len(downs) == 2
    report = json.loads((llama_aser_mlp_rotated / fmt.REPORT_FILENAME).read_text())
    assert report["provenance"]["mlp_rotation"] == {"hadamard_block": 16, "layers": 2}
    ids = torch.randint(0, 200, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.log_softmax(load_torch_model(tiny_llama, torch.float32)(ids).logits, -1)
        got = torch.log_softmax(load_reference_model(llama_aser_mlp_rotated)(ids).logits, -1)
        reference = load_reference_model(llama_aser_mlp_rotated)
        for module in reference.modules():  # the same artifact with the rotation forgotten
            if getattr(module, "hadamard", 0):
                module.hadamard = 0
        forgotten = torch.log_softmax(reference(ids).logits, -1)
    error = float((got.exp() * (got - want)).sum(-1).mean())  # KL(quantized || full precision)
    broken = float((forgotten.exp() * (forgotten - want)).sum(-1).mean())
    assert error < 0.01 and broken > 4 * error, (error, broken)


def test_format_refuses_inconsistent_rotation_entries():
    ok = dict(ranks={"a.down_proj": 8}, input_hadamard={"a.down_proj": 16}, format_version=2)
    assert fmt.ASERQuantConfig(**ok).hadamard_of("a.down_proj") == 16
    with pytest.raises(fmt.FormatError, match="needs format_version 2"):
        fmt.ASERQuantConfig(**dict(ok, format_version=1))
    with pytest.raises(fmt.FormatError, match="power of two"):
        fmt.ASERQuantConfig(**dict(ok, input_hadamard={"a.down_proj": 12}))
    with pytest.raises(fmt.FormatError, match="not a quantized module"):
        fmt.ASERQuantConfig(**dict(ok, input_hadamard={"b.down_proj": 16}))
    assert fmt.ASERQuantConfig.version_for({}) == 1 and fmt.ASERQuantConfig.version_for({"x": 2}) == 2


def test_explicit_rotation_of_a_model_without_a_gated_mlp_is_refused(phi3_and_moe, calib_text, tmp_path):
    with pytest.raises(UnsupportedModelError, match="no mlp.gate_proj"):
        quantize(phi3_and_moe["phi3"], tmp_path / "out", calib_text, mlp_hadamard="16")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3), (torch.float16, 1e-3)])
@pytest.mark.parametrize("rows", [0, 1, 7, 33])
@pytest.mark.parametrize("block,width", [(2, 6), (16, 304), (64, 192), (512, 1536)])
def test_native_butterfly_matches_the_oracle(rows, block, width, dtype, rtol):
    from vllm_aser.kernels.hadamard import native_hadamard_available

    if not native_hadamard_available(torch.device("cpu")):
        pytest.fail("the native CPU extension is not built (scripts/setup_cpu_env.sh builds it)")
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)).to(dtype)
    got = torch.ops.aser_cpu.hadamard(x, block)
    assert got.dtype == dtype and got.shape == x.shape
    want = block_hadamard(x.float(), block) * block**0.5
    if rows:
        err = float((got.float() - want).norm() / want.norm())
        assert err < rtol, err
    # non-contiguous input (a view) is read correctly
    wide = torch.randn(3, 2 * width).to(dtype)
    torch.testing.assert_close(torch.ops.aser_cpu.hadamard(wide[:, ::2], block),
                               torch.ops.aser_cpu.hadamard(wide[:, ::2].contiguous(), block))
    with pytest.raises(RuntimeError, match="not a multiple of the block"):
        torch.ops.aser_cpu.hadamard(torch.zeros(2, block + 1), block)


def test_a_tensor_parallel_slice_that_splits_a_block_is_refused_at_load():
    from vllm_aser.linear_method import ASERLinearMethod

    spec = fmt.ASERQuantConfig(ranks={"m.down_proj": 8}, input_hadamard={"m.down_proj": 16}, format_version=2)
    method = ASERLinearMethod(spec, [8], "m.down_proj", 16)
    with pytest.raises(ValueError, match="152 input features per tensor-parallel rank is not a multiple of the "
                                         "layer's input Hadamard block 16.*--mlp-hadamard 8"):
        method.create_weights(torch.nn.Module(), 152, [128], 304, 128, torch.float32, weight_loader=None)


def test_auto_leaves_group_wise_weights_unrotated_and_says_why(tiny_llama, calib_text, tmp_path):
    out = quantize(tiny_llama, tmp_path / "g64", calib_text, rank=8, group_size=64, rotate="hadamard",
                   mlp_hadamard="auto")
    cfg = fmt.read_quant_config(out)
    assert cfg.input_hadamard == {} and cfg.format_version == 1  # still loadable by plugins without the rotation
    provenance = json.loads((out / fmt.REPORT_FILENAME).read_text())["provenance"]
    assert provenance["mlp_rotation"] is None and "group-wise weight scales" in provenance["mlp_rotation_refused"]
