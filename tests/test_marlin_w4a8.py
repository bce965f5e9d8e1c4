"""ASER's main GEMM on vLLM's Marlin W4A8 kernel: packing, per-layer choice and the call, checked on CPU.

vLLM's Marlin ops are CUDA-only; tests/marlin_fakes.py emulates them from the layouts ASER hands over, so what is
checked here is everything on ASER's side of the call (the kernels themselves run in the GPU tests).
"""

from __future__ import annotations

import pytest
import torch

import marlin_fakes
from vllm_aser.kernels import marlin_w4a8
from vllm_aser.kernels.reference import dequantize_weight


def random_codes(n: int, k: int, groups: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, groups, generator=g) * 0.02 + 0.002
    return q, scale


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_packing_is_vllm_gptq_layout():
    from vllm.model_executor.layers.quantization.utils.quant_utils import pack_rows

    q, _ = random_codes(40, 136, 1)
    packed = marlin_w4a8.pack_uint4b8(q)
    assert packed.shape == (17, 40) and packed.dtype == torch.int32
    assert torch.equal(packed, pack_rows((q.to(torch.int32) + 8).t().contiguous(), 4, 136, 40))
    assert torch.equal(marlin_fakes.unpack_uint4b8(packed).t(), q.to(torch.int64))


@pytest.mark.parametrize("args,reason", [
    (dict(bits=8), "8-bit weights"),
    (dict(act_bits=16), "16-bit activations"),
    (dict(act_dtype=torch.float32), "activation dtype"),
    (dict(group_size=16), "group size 16"),
    (dict(n=4096 + 32), "not a multiple of Marlin's 64 x 128 tile"),
    (dict(k=4096 + 64), "not a multiple"),
    (dict(capability=75), "compute capability >= 8.0"),
    (dict(capability=None), "compute capability"),
    (dict(have_ops=False), "no Marlin ops"),
])
def test_marlin_refuses_what_it_cannot_run(args, reason):
    layer = dict(bits=4, act_bits=8, n=4096, k=4096, group_size=128, act_dtype=torch.bfloat16, capability=90,
                 have_ops=True)
    assert marlin_w4a8.why_not(**layer) is None
    for group in (-1, 32, 64):
        assert marlin_w4a8.why_not(**{**layer, "group_size": group}) is None
    assert reason in marlin_w4a8.why_not(**{**layer, **args})


def test_marlin_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(marlin_w4a8.NO_MARLIN_ENV_VAR, "1")
    assert marlin_w4a8.NO_MARLIN_ENV_VAR in marlin_w4a8.why_not(4, 8, 128, 128, -1, torch.float16, 90, True)


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("n,k,group", [(64, 128, -1), (192, 384, 128), (128, 256, 32), (64, 384, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_marlin_gemm_matches_reference(monkeypatch, m, n, k, group, dtype):
    """Prepared by vLLM's own MarlinLinearKernel, called with ASER's int8 codes: the product of the reference."""
    marlin_fakes.install(monkeypatch)
    q, scale = random_codes(n, k, 1 if group == -1 else k // group, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3
    w = marlin_w4a8.prepare(q, scale, group, dtype)
    assert (w.global_scale is not None) == (group != -1)  # the int8 path's int16 group scales
    xq, xs = marlin_fakes.int8_per_token(x)
    out = marlin_w4a8.gemm(xq, xs, w.qweight, w.scales, w.zeros, w.g_idx, w.perm, w.workspace, w.global_scale,
                           None, n, w.is_k_full)
    expected = (xq.float() * xs.reshape(-1, 1)) @ dequantize_weight(q, scale, group).t()
    assert out.shape == (m, n) and out.dtype == dtype
    # per channel: the scales are rounded to the activation dtype; groups: to 12-bit integers of the layer's max
    assert rel_err(out, expected) < (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_marlin_epilogue_adds_the_permuted_bias(monkeypatch):
    marlin_fakes.install(monkeypatch)
    q, scale = random_codes(128, 128, 1)
    bias = torch.randn(128)
    w = marlin_w4a8.prepare(q, scale, -1, torch.float16)
    xq, xs = marlin_fakes.int8_per_token(torch.randn(3, 128))
    permuted = marlin_w4a8.permute_bias(bias.half())
    assert not torch.equal(permuted, bias.half())  # the epilogue's column order is not the natural one
    with_bias = marlin_w4a8.gemm(xq, xs, w.qweight, w.scales, w.zeros, w.g_idx, w.perm, w.workspace, None,
                                 permuted, 128, True)
    without = marlin_w4a8.gemm(xq, xs, w.qweight, w.scales, w.zeros, w.g_idx, w.perm, w.workspace, None, None, 128,
                               True)
    assert torch.allclose((with_bias - without).float(), bias.half().float().expand(3, -1), atol=2e-2)


def test_older_marlin_signature_gets_its_extra_arguments(monkeypatch):
    """vLLM 0.26 (the GPU image's torch) passes g_idx / perm / is_k_full; the call is built from the signature."""
    marlin_fakes.install(monkeypatch, gemm=marlin_fakes.marlin_gemm_v026)
    marlin_fakes.CALLS_V026.clear()
    q, scale = random_codes(64, 128, 1)
    w = marlin_w4a8.prepare(q, scale, -1, torch.float16)
    xq, xs = marlin_fakes.int8_per_token(torch.randn(2, 128))
    marlin_w4a8.gemm(xq, xs, w.qweight, w.scales, w.zeros, w.g_idx, w.perm, w.workspace, None, None, 64, False)
    assert marlin_fakes.CALLS_V026 == [dict(g_idx=w.g_idx, perm=w.perm, is_k_full=False)]


def test_unknown_marlin_signature_is_refused_with_the_switch(monkeypatch):
    def marlin_gemm_future(a, b_q_weight, b_scales, new_required_thing):
        raise AssertionError("not reached")

    marlin_fakes.install(monkeypatch, gemm=marlin_gemm_future)
    q, scale = random_codes(64, 128, 1)
    with pytest.raises(RuntimeError, match=f"new_required_thing.*{marlin_w4a8.NO_MARLIN_ENV_VAR}=1"):
        marlin_w4a8.prepare(q, scale, -1, torch.float16)  # at load, before any forward


def test_group_scale_rounding_is_small_on_real_weights():
    """Marlin's int8 path keeps group scales as 12-bit integers of the layer's largest one. On a random layer with
    scales spread over a decade that adds < 0.01% to the int4 rounding error's energy."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_act_int8_process_scales

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=g) * torch.logspace(-1, 0, 256)[:, None]
    groups = w.reshape(256, 8, 128)
    scale = groups.abs().amax(-1) / 7
    q = torch.clamp(torch.round(groups / scale[..., None]), -8, 7)
    ints, factor = marlin_act_int8_process_scales(scale.half())
    rounded = ints.view(torch.int16).float() * factor
    quant_error = ((q * scale[..., None]) - groups).pow(2).sum()
    extra = ((q * rounded[..., None]) - (q * scale[..., None])).pow(2).sum()
    assert float(extra / quant_error) < 1e-4
