"""The CUDA path's Triton kernels against the torch reference, on odd shapes.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors. Triton reads that variable when it is
imported and again at each launch, so it cannot be switched on inside a process where vLLM already imported
Triton: scripts/test.sh runs this module in its own pytest process with the variable set (and keeps it away
from the vLLM engines of the other tests). With a GPU the kernels run compiled on CUDA.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

from vllm_aser.kernels.reference import aser_linear, dequantize_weight, fake_quantize_per_token

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = pytest.mark.skipif(
    not (ON_CUDA or INTERPRETED),
    reason="no GPU: run `TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py` in its own process "
    "(scripts/test.sh does)",
)


@pytest.fixture(scope="module")
def tk():
    return importlib.import_module("vllm_aser.kernels.triton_w4a8")


def random_layer(n: int, k: int, rank: int, group: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-7, 8, (n, k), dtype=torch.int8, generator=g)
    groups = 1 if group == -1 else -(-k // group)
    scale = torch.rand(n, groups, generator=g) * 0.02 + 0.005
    inv_smooth = torch.rand(k, generator=g) + 0.5
    down = (torch.randn(rank, k, generator=g) * 0.1).to(dtype) if rank else None
    up = (torch.randn(n, rank, generator=g) * 0.1).to(dtype) if rank else None
    bias = torch.randn(n, generator=g).to(dtype)
    return q, scale, inv_smooth, down, up, bias


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def to_dev(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("m", [1, 7, 33, 257])
@pytest.mark.parametrize("k,n,rank,group", [(72, 40, 8, -1), (200, 104, 24, -1), (136, 72, 16, 128),
                                            (96, 50, 0, 64), (160, 88, 40, 64)])
def test_aser_linear_matches_reference(tk, m, k, n, rank, group):
    dtype = torch.float16 if ON_CUDA else torch.float32
    q, scale, inv_smooth, down, up, bias = random_layer(n, k, rank, group, dtype, seed=m + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    expected = aser_linear(x.float(), dequantize_weight(q, scale, group), inv_smooth, down, up, bias, 8)
    weight = tk.pack_int4_kn(*to_dev(q, scale), group)
    up_t = None if up is None else up.t().contiguous()
    out = tk.aser_linear_triton(*to_dev(x), weight, *to_dev(inv_smooth, down, up_t, bias), act_bits=8)
    assert out.shape == (m, n) and out.dtype == dtype
    # float32 under the interpreter (exact up to summation order); fp16 output on CUDA
    assert rel_err(out, expected) < (2e-3 if ON_CUDA else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(tk, dtype):
    q, scale, inv_smooth, down, up, bias = random_layer(48, 120, 16, -1, dtype, seed=3)
    x = torch.randn(9, 120).to(dtype)
    expected = aser_linear(x, dequantize_weight(q, scale, -1), inv_smooth, down, up, bias, 8)
    out = tk.aser_linear_triton(*to_dev(x), tk.pack_int4_kn(*to_dev(q, scale), -1),
                                *to_dev(inv_smooth, down, up.t().contiguous(), bias))
    assert out.dtype == dtype
    assert rel_err(out, expected) < 1e-2  # the low-rank input is rounded to the factors' dtype


@pytest.mark.parametrize("act_bits", [8, 6])
def test_activation_codes_and_scales(tk, act_bits):
    """Codes equal the reference's rounding (ties aside: the reference rounds half to even) and scales match."""
    x = torch.randn(33, 200) * torch.logspace(0, 2, 200)
    inv_smooth = torch.rand(200) + 0.5
    xq, xs, t = tk.smooth_quant_lowrank(*to_dev(x, inv_smooth), None, act_bits)
    assert t is None and xq.dtype == torch.int8
    smoothed = x * inv_smooth
    qmax = 2 ** (act_bits - 1) - 1
    assert torch.allclose(xs.cpu(), smoothed.abs().amax(1) / qmax, rtol=1e-6)
    reference = fake_quantize_per_token(smoothed, act_bits) / xs.cpu()[:, None]
    assert (xq.cpu().float() - reference).abs().max() <= 1.0 + 1e-4
    assert (xq.cpu().float() == reference.round()).float().mean() > 0.999


def test_packing_round_trip(tk):
    q = torch.randint(-8, 8, (19, 45), dtype=torch.int8)
    packed = tk.pack_int4_kn(q, torch.ones(19, 1), -1).packed
    assert packed.shape == (32, 19) and packed.dtype == torch.uint8  # one 64-wide unit: 32 byte rows, K-major
    lo, hi = (packed.t().to(torch.int16) & 0xF), (packed.t().to(torch.int16) >> 4)
    codes = torch.cat([lo, hi], dim=1)  # low nibbles hold k = 0..31, high nibbles k = 32..63
    codes = torch.where(codes >= 8, codes - 16, codes)  # 4-bit two's complement
    assert torch.equal(codes[:, :45].to(torch.int8), q)
    assert int(codes[:, 45:].abs().max()) == 0  # padding decodes to zero


def test_group_size_must_suit_the_kernel(tk):
    with pytest.raises(ValueError, match="multiple of 64"):
        tk.pack_int4_kn(torch.zeros(4, 96, dtype=torch.int8), torch.ones(4, 3), 32)


@pytest.mark.parametrize("group", [-1, 64])
def test_cuda_kernel_glue_matches_reference_kernel(tk, group):
    """The plugin's `cuda` kernel (weight re-layout at load + the custom op) against its `reference` kernel."""
    from torch import nn

    from vllm_aser.kernels.select import CUDAKernel, ReferenceKernel

    q, scale, inv_smooth, down, up, bias = random_layer(72, 96, 16, group, torch.float32, seed=11)
    x = torch.randn(5, 96)
    outputs = []
    for kernel in (CUDAKernel(), ReferenceKernel()):
        layer = nn.Module()
        layer.aser_act_dtype, layer.aser_out_features, layer.aser_act_bits = torch.float32, 72, 8
        kernel.prepare(layer, *to_dev(q, scale, inv_smooth, down, up), group)
        outputs.append(kernel.apply(layer, *to_dev(x, bias)).cpu())
    assert rel_err(outputs[0], outputs[1]) < (2e-3 if ON_CUDA else 1e-5)  # CUDA: float32 dots run as TF32


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("n,rank,splits,bias", [(40, 8, 1, True), (104, 24, 3, False), (72, 0, 0, True)])
def test_lowrank_up_add_in_place(tk, m, n, rank, splits, bias):
    g = torch.Generator().manual_seed(m * n)
    out = torch.randn(m, n, generator=g).to(torch.float16)
    t = torch.randn(splits, m, rank, generator=g) if rank else None
    up_t = (torch.randn(rank, n, generator=g) * 0.1).to(torch.float16) if rank else None
    b = torch.randn(n, generator=g).to(torch.float16) if bias else None
    expected = out.float() + (t.sum(0) @ up_t.float() if rank else 0) + (b.float() if bias else 0)
    result = tk.lowrank_up_add_(*to_dev(out, t, up_t, b))
    assert rel_err(result, expected) < 2e-3  # fp16 output


@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("group,bias", [(-1, True), (128, False), (64, True)])
def test_cuda_kernel_marlin_path_matches_reference_kernel(monkeypatch, m, group, bias):
    """The plugin's `cuda` kernel on its Marlin path (ASER's Triton kernels around vLLM's Marlin GEMM, here
    emulated by tests/marlin_fakes.py off the GPU) against its `reference` kernel."""
    from torch import nn

    import marlin_fakes
    from vllm_aser.kernels.select import CUDAKernel, ReferenceKernel

    if not ON_CUDA:
        marlin_fakes.install(monkeypatch)
    q, scale, inv_smooth, down, up, b = random_layer(128, 256, 16, group, torch.float16, seed=m)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(torch.float16)
    outputs = []
    for kernel in (CUDAKernel(), ReferenceKernel()):
        layer = nn.Module()
        layer.aser_act_dtype, layer.aser_out_features, layer.aser_act_bits = torch.float16, 128, 8
        if bias:
            layer.bias = nn.Parameter(b.to(DEVICE), requires_grad=False)
        kernel.prepare(layer, *to_dev(q, scale.half(), inv_smooth, down, up), group)
        outputs.append(kernel.apply(layer, *to_dev(x, b if bias else None)).cpu())
        if isinstance(kernel, CUDAKernel):
            assert layer.aser_cuda_path == "marlin"
            assert (layer.aser_marlin_bias is not None) == bias  # the layer's bias goes to Marlin's epilogue
    assert rel_err(outputs[0], outputs[1]) < 3e-3  # fp16 scales and output


def test_cuda_kernel_falls_back_to_triton_per_layer(monkeypatch, caplog):
    """A shape Marlin's tiles do not fit runs on ASER's Triton GEMM, and the log says why."""
    from torch import nn

    import marlin_fakes
    from vllm_aser.kernels import select

    if not ON_CUDA:
        marlin_fakes.install(monkeypatch)
    from vllm_aser.kernels.path_log import KernelPathLog

    monkeypatch.setattr(select, "PATHS", KernelPathLog())
    q, scale, inv_smooth, down, up, _ = random_layer(72, 96, 8, -1, torch.float16, seed=1)
    layer = nn.Module()
    layer.aser_act_dtype, layer.aser_out_features, layer.aser_act_bits = torch.float16, 72, 8
    layer.aser_name = "model.layers.0.mlp.down_proj"
    select.CUDAKernel().prepare(layer, *to_dev(q, scale, inv_smooth, down, up), -1)
    assert layer.aser_cuda_path == "triton"
    assert ("ASER cuda kernel: triton path for 1 layer (model.layers.0.mlp.down_proj): Marlin cannot run them: "
            "N x K = 72 x 96") in select.PATHS.summary()[0]


def test_gpu_benchmark_script_runs(tmp_path):
    """benchmarks/gpu_kernels.py end to end on tiny shapes (timings meaningless here; the checks are not)."""
    import json
    import runpy

    module = runpy.run_path("benchmarks/gpu_kernels.py", run_name="gpu_kernels")
    assert module["main"](["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_kernels.json").read_text())
    assert {r["method"] for r in data["results"]} == {"fp16", "w8a8", "w4a8", "aser"}
    assert all(r["rel_err"] < 0.02 for r in data["results"] if r["method"] == "aser")  # int8 activation noise


def test_gpu_benchmark_times_vllm_kernels(monkeypatch, tmp_path):
    """The vLLM rows (CUTLASS W8A8, Marlin W4A8, ASER on Marlin) of benchmarks/gpu_kernels.py: on CPU through
    tests/marlin_fakes.py's stand-ins, so the script's glue is checked before a GPU's minutes are spent on it."""
    import importlib.util
    import json

    import marlin_fakes

    spec = importlib.util.spec_from_file_location("gpu_kernels", "benchmarks/gpu_kernels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not ON_CUDA:
        marlin_fakes.install_vllm_benchmark_ops(monkeypatch)
        monkeypatch.setattr(module, "vllm_why_not", lambda device: None)
    assert module.main(["--smoke", "--vllm", "on", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "gpu_kernels.json").read_text())["results"]
    vllm_rows = [r for r in results if r["method"] in ("w8a8_cutlass", "marlin_w4a8", "aser_marlin")]
    assert {(r["n"], r["k"]) for r in vllm_rows} == {(128, 256)}  # the one smoke shape Marlin's tiles fit
    assert len(vllm_rows) == 3 * 3  # three methods x M in (1, 7, 33)
    assert all(r["rel_err"] < 0.02 for r in vllm_rows if r["method"] == "aser_marlin")
    assert all(r["lowrank_overhead_pct"] is not None for r in vllm_rows if r["method"] == "aser_marlin")
    assert (tmp_path / "gpu_kernels.csv").is_file() and (tmp_path / "gpu_kernels.png").is_file()
