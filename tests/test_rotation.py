"""--rotate hadamard (residual-stream rotation folded into the weights)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quantize
from torch import nn

from vllm_aser_offline.model.model_structure import DecoderStack, UnsupportedModelError, find_decoder_stack
from vllm_aser_offline.transform.rotation import (
    check_rotatable,
    hadamard_matrix,
    head_dim,
    residual_rotation,
    rotate_block,
    rotate_outside,
)
from vllm_aser_offline.evaluate.simulate import load_reference_model


@pytest.mark.parametrize("n", [1, 2, 4, 12, 20, 28, 44, 72, 96, 128, 576, 768, 896, 1536])
def test_hadamard_orders_of_common_hidden_sizes(n):
    h = hadamard_matrix(n)
    assert h is not None and h.shape == (n, n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [3, 6, 10, 130])
def test_orders_without_a_hadamard_matrix_fall_back_to_a_random_orthogonal_one(n):
    assert hadamard_matrix(n) is None
    rotation = residual_rotation(n, seed=0)
    assert rotation.kind == "orthogonal"
    torch.testing.assert_close(rotation.matrix @ rotation.matrix.t(), torch.eye(n, dtype=torch.float64))


def test_random_hadamard_rotation_is_orthogonal_and_seeded():
    a, b, c = residual_rotation(96, 0), residual_rotation(96, 0), residual_rotation(96, 1)
    assert a.kind == "hadamard"
    torch.testing.assert_close(a.matrix @ a.matrix.t(), torch.eye(96, dtype=torch.float64))
    assert torch.equal(a.matrix, b.matrix) and not torch.equal(a.matrix, c.matrix)
    assert a.matrix.abs().unique().numel() == 1  # every entry +-1/sqrt(n): outliers spread evenly


def _load_whole(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _rotate_whole(model, seed=0) -> bool:
    stack = find_decoder_stack(model)
    check_rotatable(model, stack)
    rotation = residual_rotation(model.get_input_embeddings().weight.shape[1], seed, head_dim(stack.layers[0]))
    assert rotation.head is not None
    untied = rotate_outside(model, stack, rotation)
    for i, block in enumerate(stack.layers):
        rotate_block(block, f"{stack.prefix}.{i}", rotation)
    return untied


@pytest.mark.parametrize("fixture,untied", [("tiny_llama", False), ("tiny_qwen2", False),
                                            ("tiny_qwen2_tied", True)])
def test_rotated_model_computes_the_same_function(fixture, untied, request):
    model_dir = request.getfixturevalue(fixture)
    model = _load_whole(model_dir)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    assert _rotate_whole(model) == untied
    assert model.config.tie_word_embeddings is False or not untied
    with torch.no_grad():
        after = model(ids).logits
    assert float((after - before).norm() / before.norm()) < 1e-5
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    if untied:
        assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_tied_embeddings_with_unit_final_norm_stay_tied(tiny_qwen2_tied):
    model = _load_whole(tiny_qwen2_tied)
    with torch.no_grad():
        model.model.norm.weight.fill_(1.0)
    assert _rotate_whole(model) is False
    assert model.lm_head.weight is model.get_input_embeddings().weight


class _GemmaLikeNorm(nn.Module):
    """(1 + w) * x / rms(x): does not commute with a rotation once w is folded the usual way."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_norms_that_do_not_commute_with_a_rotation_are_refused(tiny_llama):
    model = _load_whole(tiny_llama)
    block = model.model.layers[0]
    block.input_layernorm = _GemmaLikeNorm(block.input_layernorm.weight.detach().clone())
    rotation = residual_rotation(model.config.hidden_size, 0)
    with pytest.raises(UnsupportedModelError, match=r"model.layers.0.input_layernorm.*--rotate none"):
        rotate_block(block, "model.layers.0", rotation)


def test_blocks_of_an_unknown_layout_are_refused_by_name():
    class Block(nn.Module):  # Phi-3's fused projections
        def __init__(self):
            super().__init__()
            self.qkv_proj = nn.Linear(8, 24)

    stack = DecoderStack("model.layers", nn.ModuleList([Block()]))
    with pytest.raises(UnsupportedModelError, match="no input_layernorm.*--rotate none"):
        check_rotatable(nn.Module(), stack)


def test_quantizing_with_rotation_refuses_an_unknown_norm_and_writes_nothing(tiny_llama, calib_text, tmp_path,
                                                                          monkeypatch):
    from vllm_aser_offline.transform import rotation

    monkeypatch.setattr(rotation, "NORMS", ("input_layernorm", "no_such_norm"))
    with pytest.raises(UnsupportedModelError, match="no no_such_norm"):
        quantize(tiny_llama, tmp_path / "out", calib_text, rotate="hadamard")
    assert not any(tmp_path.iterdir())


def test_rotated_artifact_loads_untied_with_unit_norms(qwen2_aser_rotated):
    config = json.loads((qwen2_aser_rotated / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    report = json.loads((qwen2_aser_rotated / "aser_report.json").read_text())
    assert report["provenance"]["rotation"] == {"kind": "hadamard", "untied_embeddings": True}
    model = load_reference_model(qwen2_aser_rotated)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight") and "_norm" not in n]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)


def test_rotation_lowers_the_error_of_plain_rtn_on_outlier_channels(tiny_llama, calib_text, workdir):
    """Real LLMs carry a few residual channels far larger than the rest. Give the tiny Llama three (its
    embedding columns 0-2 scaled 30x): per-token int8 activations then spend their range on them, and a
    rotation, which spreads them over all channels, brings plain W4A8 RTN closer to full precision."""
    import shutil

    from test_quantizer import logits_error

    source = workdir / "llama-outliers"
    if not source.exists():
        shutil.copytree(tiny_llama, source)
        model = _load_whole(tiny_llama)
        with torch.no_grad():
            model.get_input_embeddings().weight[:, :3] *= 30
        model.save_pretrained(source)
    errors = {}
    for rotate in ("none", "hadamard"):
        out = quantize(source, workdir / f"llama-outliers-rtn-{rotate}", calib_text, method="rtn", base="rtn",
                       clip="minmax", rotate=rotate, dtype="float32")
        errors[rotate] = logits_error(out, source, calib_text)
    assert errors["hadamard"] < 0.7 * errors["none"], errors



def test_cli_rotation_reports_the_untied_head(tiny_qwen2_tied, calib_text, tmp_path, capsys):
    from vllm_aser_offline.cli import main as cli_main

    code = cli_main([str(tiny_qwen2_tied), str(tmp_path / "o"), "--calib", str(calib_text), "--num-samples", "4",
                     "--seq-len", "64", "--rank", "8", "--quiet", "--rotate", "hadamard"])
    assert code == 0
    assert "separate lm_head.weight" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([str(tiny_qwen2_tied), str(tmp_path / "p"), "--calib", str(calib_text), "--rotate", "spin"])
