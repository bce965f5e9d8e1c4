"""Scales refitted after rounding (offline/weight_quant.refit_scales) against a brute-force least squares."""

from __future__ import annotations

import pytest
import torch

from offline.gptq import quantize_gptq
from offline.weight_quant import quantize_rtn, refit_scales
from tests.test_gptq import layer, rel_output_error
from tests.test_reconstruction import correlated_inputs


@pytest.mark.parametrize("shape", [(1, 37), (7, 130), (33, 200)])
@pytest.mark.parametrize("group_size", [-1, 16, 24])
@pytest.mark.parametrize("base", ["rtn", "gptq"])
def test_refit_never_raises_the_output_error(shape, group_size, base):
    w, gram = layer(*shape)
    q, scale = quantize_rtn(w, 4, group_size) if base == "rtn" else quantize_gptq(w, gram, 4, group_size)
    before = rel_output_error(w, q, scale, group_size, gram)
    refitted = refit_scales(w, q, scale, gram, group_size)
    after = rel_output_error(w, q, refitted, group_size, gram)
    assert refitted.shape == scale.shape and refitted.dtype == torch.float32
    assert (refitted > 0).all()
    assert after <= before * (1 + 1e-6), (after, before)
    if base == "rtn":  # round-to-nearest's scale is chosen blind to the inputs: the refit must find something
        assert after < 0.99 * before, (after, before)


@pytest.mark.parametrize("group_size", [-1, 16])
def test_refit_solves_the_least_squares_problem(group_size):
    """Each row's scales equal the least-squares solution of W X ~ s * (Q X), solved directly on the samples."""
    in_f = 40
    x = correlated_inputs(in_f, 300, 3).double()  # [tokens, in]
    w = torch.randn(5, in_f, generator=torch.Generator().manual_seed(4))
    q, scale = quantize_rtn(w, 4, group_size)
    refitted = refit_scales(w, q, scale, x.t() @ x, group_size).double()
    size = in_f if group_size == -1 else group_size
    for row in range(w.shape[0]):
        design = torch.stack([x[:, k:k + size] @ q[row, k:k + size].double() for k in range(0, in_f, size)], dim=1)
        target = x @ w[row].double()
        expected = torch.linalg.lstsq(design, target.unsqueeze(1)).solution.squeeze(1)
        torch.testing.assert_close(refitted[row], expected, rtol=1e-5, atol=1e-8)


def test_idle_groups_and_singular_rows_keep_their_scales():
    w, gram = layer(4, 48)
    w[0, 16:32] = 0.0  # row 0, group 1: all codes zero
    q, scale = quantize_rtn(w, 4, 16)
    gram[32:, :] = 0.0  # the last group never sees any input
    gram[:, 32:] = 0.0
    refitted = refit_scales(w, q, scale, gram, 16)
    assert refitted[0, 1] == scale[0, 1]
    torch.testing.assert_close(refitted[:, 2], scale[:, 2])
    assert not torch.equal(refitted[:, 0], scale[:, 0])


def test_refit_scales_in_the_pipeline(tiny_llama, calib_text, llama_aser_fp32, workdir):
    """--refit-scales changes only the scales: same codes, recorded in the report, and the reference loads it."""
    import json

    from conftest import quantize
    from safetensors.torch import load_file

    from offline.simulate import load_reference_model
    from vllm_aser import format as fmt

    refit = quantize(tiny_llama, workdir / "llama-aser-refit", calib_text, rank_budget=15.0, dtype="float32",
                     refit_scales=True)
    report = json.loads((refit / fmt.REPORT_FILENAME).read_text())
    assert report["provenance"]["options"]["refit_scales"] is True
    name = "model.layers.0.mlp.down_proj"
    plain_t, refit_t = (load_file(str(next(d.glob("*.safetensors")))) for d in (llama_aser_fp32, refit))
    packed, scale = fmt.tensor_name(name, fmt.WEIGHT_PACKED), fmt.tensor_name(name, fmt.WEIGHT_SCALE)
    assert torch.equal(plain_t[packed], refit_t[packed])
    assert not torch.equal(plain_t[scale], refit_t[scale])
    load_reference_model(refit)
