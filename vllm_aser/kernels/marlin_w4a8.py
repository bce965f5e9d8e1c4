"""ASER's main GEMM on vLLM's Marlin kernel with int8 activations (W4A8-INT8, vLLM PR 24722).

ASER's main product is int4 weights x int8 per-token activations with per-channel or group scales: exactly what
Marlin's `kS8 x kU4B8` kernels compute. This module only adapts: the artifact's signed int4 codes become GPTQ's
`uint4b8` layout ([K / 8, N] int32, code + 8), and vLLM's own `MarlinLinearKernel.process_weights_after_loading`
repacks them and permutes the scales (including the int8 path's int16 group scales and their global factor), so
the tile layout stays vLLM's business. At run time ASER's Triton kernel produces the smoothed int8 codes, the
per-token scales and the low-rank down-projection; `marlin_gemm` is called on those codes; a second small Triton
kernel adds the low-rank up-projection in place.

vLLM's Marlin signatures change between releases (0.26 passes `g_idx`/`perm`/`is_k_full`, 0.32 does not), so the
call is built from the installed `marlin_gemm`'s own parameter names.

Needs a CUDA build of vLLM: nothing here runs on CPU except the packing and the checks (tests emulate the rest).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from torch import nn

NO_MARLIN_ENV_VAR = "VLLM_ASER_CUDA_NO_MARLIN"  # 1: every layer on ASER's Triton GEMM instead
GROUP_SIZES = (-1, 32, 64, 128)  # Marlin's int8-activation kernels: group_blocks -1, 2, 4, 8 (x 16)
TILE_N, TILE_K = 64, 128  # the thread tile every shape must fill (vLLM would pad otherwise: copies per call)
MIN_CAPABILITY = 80  # int8 mma.sync


def why_not(bits: int, act_bits: int, n: int, k: int, group_size: int, act_dtype: torch.dtype,
            capability: int | None, have_ops: bool) -> str | None:
    """None when Marlin can run this layer; otherwise the reason, for the log."""
    if os.environ.get(NO_MARLIN_ENV_VAR) == "1":
        return f"{NO_MARLIN_ENV_VAR}=1"
    if not have_ops:
        return "this vLLM build has no Marlin ops (marlin_gemm / gptq_marlin_repack)"
    if capability is None or capability < MIN_CAPABILITY:
        return f"Marlin's int8-activation kernels need compute capability >= {MIN_CAPABILITY / 10:.1f}"
    if bits != 4:
        return f"{bits}-bit weights (Marlin W4A8 takes 4-bit)"
    if act_bits > 8:
        return f"{act_bits}-bit activations (Marlin W4A8 takes int8 codes)"
    if act_dtype not in (torch.float16, torch.bfloat16):
        return f"activation dtype {act_dtype} (Marlin writes fp16/bf16)"
    if group_size not in GROUP_SIZES:
        return f"weight group size {group_size} (Marlin's int8 path has {', '.join(map(str, GROUP_SIZES))})"
    if n % TILE_N or k % TILE_K:
        return f"N x K = {n} x {k} is not a multiple of Marlin's {TILE_N} x {TILE_K} tile"
    if group_size > 0 and k % group_size:
        return f"K = {k} is not a multiple of the group size {group_size}"
    return None


def have_marlin_ops() -> bool:
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's compiled ops into torch.ops._C)
    except ImportError:
        return False
    return hasattr(torch.ops._C, "marlin_gemm") and hasattr(torch.ops._C, "gptq_marlin_repack")


def cuda_capability(device: torch.device) -> int | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def pack_uint4b8(q: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes [N, K] -> GPTQ's layout: [K / 8, N] int32, code + 8, eight K values per word (low bits
    first). compressed-tensors' packer applies the same +8 offset, so it is reused (packing along K, transposed)."""
    return pack_to_int32(q.to(torch.int8), 4, packed_dim=1).t().contiguous()


@dataclasses.dataclass
class MarlinWeights:
    """What `marlin_gemm` needs besides the activations, after vLLM's repack."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor | None
    perm: torch.Tensor | None
    workspace: torch.Tensor
    global_scale: torch.Tensor | None  # int8 path with groups: the factor of the int16 group scales
    is_k_full: bool


def _ensure_parallel_state() -> None:
    """vLLM's parameter classes ask the tensor-parallel group for their rank when built. Inside an engine it exists;
    outside one (benchmarks, tests) a one-process group is set up through vLLM's own API, as its tests do, instead
    of patching vLLM's functions."""
    from vllm.distributed import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                                    distributed_init_method=f"tcp://127.0.0.1:{port}")
        parallel_state.initialize_model_parallel(1, 1)


def _no_loader(*args, **kwargs) -> None:
    raise RuntimeError("ASER's Marlin holder is built from loaded tensors, never loaded")


def prepare(q: torch.Tensor, scale: torch.Tensor, group_size: int, act_dtype: torch.dtype) -> MarlinWeights:
    """q int8 [N, K], scale [N, groups] (the artifact's layout, on the target device) -> repacked for Marlin by
    vLLM's own MarlinLinearKernel (so its permutations and int8-path scale handling are the ones it tests)."""
    from vllm.model_executor.kernels.linear.mixed_precision.marlin import MarlinLinearKernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.model_executor.layers.quantization.utils import marlin_utils
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
    from vllm.scalar_type import scalar_types

    _marlin_api()  # refuses an unknown marlin_gemm signature at load, not at the first forward
    n, k = q.shape
    settings = dict(full_weight_shape=(k, n), partition_weight_shape=(k, n), weight_type=scalar_types.uint4b8,
                    act_type=torch.int8, group_size=group_size, zero_points=False, has_g_idx=False,
                    out_type=act_dtype)
    fields = {f.name for f in dataclasses.fields(MPLinearLayerConfig)}
    config = MPLinearLayerConfig(**{key: value for key, value in settings.items() if key in fields})
    holder = nn.Module()  # no bias: vLLM's kernel would permute it in place
    _ensure_parallel_state()
    holder.register_parameter("weight_packed", PackedvLLMParameter(
        data=pack_uint4b8(q), input_dim=0, output_dim=1, packed_dim=0, packed_factor=8, weight_loader=_no_loader))
    holder.register_parameter("weight_scale", GroupQuantScaleParameter(
        data=scale.t().to(act_dtype).contiguous(), input_dim=0, output_dim=1, weight_loader=_no_loader))
    kernel = MarlinLinearKernel(config, "weight_packed", "weight_scale")
    kernel.process_weights_after_loading(holder)
    workspace = getattr(kernel, "workspace", None)
    if workspace is None:
        workspace = marlin_utils.marlin_make_workspace_new(q.device, getattr(marlin_utils, "MARLIN_MAX_BLOCKS_PER_SM", 1))
    return MarlinWeights(
        qweight=holder.weight_packed.data, scales=holder.weight_scale.data, zeros=holder.w_zp.data,
        g_idx=_data(getattr(holder, "g_idx", None)), perm=_data(getattr(holder, "g_idx_sort_indices", None)),
        workspace=workspace, global_scale=_data(getattr(holder, "input_global_scale", None)),
        is_k_full=getattr(kernel, "is_k_full", True),
    )


def _data(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.data


def permute_bias(bias: torch.Tensor) -> torch.Tensor:
    """The layer's bias in the column order Marlin's epilogue reads."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_permute_bias

    return marlin_permute_bias(bias)


# every marlin_gemm parameter ASER can supply (0.26 and 0.32 between them)
KNOWN_PARAMETERS = ("a", "c", "b_q_weight", "b_bias", "b_scales", "a_scales", "global_scale", "b_zeros", "g_idx",
                    "perm", "workspace", "b_q_type", "size_m", "size_n", "size_k", "is_k_full", "use_atomic_add",
                    "use_fp32_reduce", "is_zp_float")


@functools.cache
def _marlin_api():
    """vLLM's marlin_gemm, the names of its parameters ASER passes, and the helpers the call needs: resolved once
    (at load, from `prepare`), so a vLLM whose marlin_gemm requires something unknown is refused before serving."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils.marlin_utils import should_use_atomic_add_reduce
    from vllm.scalar_type import scalar_types

    parameters = inspect.signature(ops.marlin_gemm).parameters.values()
    unknown = [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name not in KNOWN_PARAMETERS]
    if unknown:
        raise RuntimeError(f"vLLM's marlin_gemm takes parameters ASER does not know ({', '.join(unknown)}); "
                           f"set {NO_MARLIN_ENV_VAR}=1 to use ASER's own GEMM with this vLLM")
    names = tuple(p.name for p in parameters if p.name in KNOWN_PARAMETERS)
    return ops.marlin_gemm, names, should_use_atomic_add_reduce, scalar_types.uint4b8


def gemm(xq: torch.Tensor, a_scales: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
         zeros: torch.Tensor, g_idx: torch.Tensor | None, perm: torch.Tensor | None, workspace: torch.Tensor,
         global_scale: torch.Tensor | None, bias: torch.Tensor | None, n: int, is_k_full: bool) -> torch.Tensor:
    """int8 codes [M, K] with float32 per-token scales [M] -> [M, N] in the scales' dtype."""
    marlin_gemm, names, atomic_add, uint4b8 = _marlin_api()
    m, k = xq.shape
    a_scales = a_scales.reshape(m, 1)
    if global_scale is not None:
        a_scales = a_scales * global_scale
    values = dict(
        a=xq, c=None, b_q_weight=qweight, b_bias=bias, b_scales=scales, a_scales=a_scales, global_scale=None,
        b_zeros=zeros, g_idx=g_idx, perm=perm, workspace=workspace, b_q_type=uint4b8, size_m=m, size_n=n, size_k=k,
        is_k_full=is_k_full, use_atomic_add=atomic_add(m=m, n=n, k=k, device=xq.device, dtype=scales.dtype),
        use_fp32_reduce=True, is_zp_float=False,
    )
    return marlin_gemm(**{name: values[name] for name in names})
