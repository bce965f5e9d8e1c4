"""ASERMoEMethod: an ASER artifact's MoE experts in vLLM's FusedMoE layer, run expert by expert.

The checkpoint holds every expert's gate, up and down projection as an ordinary ASER linear
(`<experts>.<e>.<gate|up|down leaf>.weight_packed`, ...). vLLM's expert loader maps them to this layer's
`w13_*` (gate and up, stacked as vLLM's w13: gate rows first) and `w2_*` parameters, one expert and shard at a
time. After loading, each expert's w13 and w2 become two prepared linears of the selected kernel (the native
W4A8 CPU kernel where it can run them), and `apply` runs each expert on the tokens routed to it: smoothing,
int8 per-token activations, int4 weights and the low-rank branch, exactly as in a dense ASER layer. Where the
native kernel took every expert they are stacked at load and a layer's step is one native call (tokens grouped by
expert inside it, nothing read back to Python); other kernels loop over the experts in Python. Either way it is
one custom op, so torch.compile sees a single opaque call; the op finds its layer in vLLM's forward context, where
`create_weights` registered it (as vLLM's own MoE and LoRA layers register themselves).

Tensor parallelism shards the intermediate size (w13 rows, w2 columns) as vLLM does; expert parallelism is
not supported.
"""

from __future__ import annotations

import functools
import math
import os
import re

import torch
from torch import nn
from torch.nn import functional as F
from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_aser import format as fmt
from vllm_aser.kernels.reference import unpack_int
from vllm_aser.kernels.path_log import PATHS
from vllm_aser.kernels.select import select_kernel
from vllm_aser.kernels.torch_ops import _LIB

# the checkpoint's leaf names of each vLLM shard (Qwen-MoE / DeepSeek style, Mixtral style)
SHARD_LEAVES = {"w1": ("gate_proj", "w1"), "w3": ("up_proj", "w3"), "w2": ("down_proj", "w2")}
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}
LAYER_KEY_SUFFIX = ".aser_experts"  # our key in vLLM's static_forward_context: distinct from the MoE runner's
PER_EXPERT_ENV_VAR = "VLLM_ASER_MOE_PER_EXPERT"  # 1: one native call per expert (the path before grouping; to compare)


def expert_ranks(spec: fmt.ASERQuantConfig, prefix: str, num_experts: int) -> dict[str, list[int]]:
    """Per shard (w1, w3, w2), every expert's rank, from the names under `prefix` in quantization_config.ranks."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.(\w+)$")
    ranks: dict[str, list[int | None]] = {shard: [None] * num_experts for shard in SHARD_LEAVES}
    for name, rank in spec.ranks.items():
        match = pattern.match(name)
        if not match:
            continue
        shard = next((s for s, leaves in SHARD_LEAVES.items() if match.group(2) in leaves), None)
        expert = int(match.group(1))
        if shard is None or expert >= num_experts:
            raise fmt.FormatError(f"{name}: not an expert projection vLLM's FusedMoE layer {prefix} has")
        ranks[shard][expert] = rank
    for shard, values in ranks.items():
        missing = [e for e, r in enumerate(values) if r is None]
        if missing:
            raise fmt.FormatError(
                f"{prefix}: quantization_config.ranks has no {shard} ({' or '.join(SHARD_LEAVES[shard])}) entry for "
                f"expert(s) {missing[:8]}: the MoE experts were not quantized by aser-quantize; re-quantize the model"
            )
    return ranks  # type: ignore[return-value]


class ASERMoEMethod(FusedMoEMethodBase):
    def __init__(self, spec: fmt.ASERQuantConfig, prefix: str, moe):
        super().__init__(moe)
        self.spec, self.prefix = spec, prefix
        self.layer_key = prefix + LAYER_KEY_SUFFIX
        self.kernel = select_kernel()
        if self.kernel.name == "cuda":
            _warn_cuda_once()

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        spec, inter = self.spec, intermediate_size_per_partition
        PATHS.expect()
        parallel = layer.moe_config.moe_parallel_config
        if parallel.use_ep:
            raise ValueError(f"{self.prefix}: ASER MoE layers do not support expert parallelism; drop "
                             "--enable-expert-parallel")
        activation = getattr(layer.moe_config.activation, "value", str(layer.moe_config.activation))
        if activation not in _ACTIVATIONS or not layer.moe_config.is_act_and_mul:
            raise ValueError(f"{self.prefix}: ASER MoE layers run gated {', '.join(_ACTIVATIONS)} experts, this "
                             f"model's experts use {activation}")
        if parallel.tp_size > 1 and (inter % spec.pack_factor or (spec.weight_group_size != -1
                                                                   and inter % spec.weight_group_size)):
            raise ValueError(f"{self.prefix}: {inter} intermediate features per tensor-parallel rank does not split "
                             "the int4 packing or the weight groups: use a smaller --tensor-parallel-size")
        rotated = sorted(n for n in spec.input_hadamard if n.startswith(self.prefix + "."))
        if rotated:
            raise fmt.FormatError(f"{self.prefix}: expert {rotated[0]} rotates its input at run time "
                                  "(input_hadamard), which the ASER MoE method does not run: re-quantize the model "
                                  "with --mlp-hadamard none")
        ranks = expert_ranks(spec, self.prefix, num_experts)
        self.ranks = ranks
        self.tp_rank, self.tp_size = parallel.tp_rank, parallel.tp_size
        self.inter, self.hidden = inter, hidden_size
        self.activation, self.activation_name = _ACTIVATIONS[activation], activation
        context = get_current_vllm_config().compilation_config.static_forward_context
        if self.layer_key in context:
            raise ValueError(f"Duplicate layer name: {self.layer_key}")
        context[self.layer_key] = layer
        shared = spec.lowrank_shared
        r13 = max(max(g, u) if shared else g + u for g, u in zip(ranks["w1"], ranks["w3"]))
        r2 = max(ranks["w2"])
        lowrank_dtype = getattr(torch, spec.lowrank_dtype)
        shapes = {
            "w13_" + fmt.WEIGHT_PACKED: ((num_experts, 2 * inter, math.ceil(hidden_size / spec.pack_factor)), torch.int32),
            "w13_" + fmt.WEIGHT_SCALE: ((num_experts, 2 * inter, spec.num_groups(hidden_size)), torch.float32),
            "w13_" + fmt.WEIGHT_SHAPE: ((num_experts, 2), torch.int64),
            "w13_" + fmt.SMOOTH: ((num_experts, hidden_size), torch.float32),
            "w13_" + fmt.LOWRANK_DOWN: ((num_experts, r13, hidden_size), lowrank_dtype),
            "w13_" + fmt.LOWRANK_UP: ((num_experts, 2 * inter, r13), lowrank_dtype),
            "w2_" + fmt.WEIGHT_PACKED: ((num_experts, hidden_size, inter // spec.pack_factor if self.tp_size > 1
                                         else math.ceil(inter / spec.pack_factor)), torch.int32),
            "w2_" + fmt.WEIGHT_SCALE: ((num_experts, hidden_size, spec.num_groups(inter)), torch.float32),
            "w2_" + fmt.WEIGHT_SHAPE: ((num_experts, 2), torch.int64),
            "w2_" + fmt.SMOOTH: ((num_experts, inter), torch.float32),
            "w2_" + fmt.LOWRANK_DOWN: ((num_experts, r2, inter), lowrank_dtype),
            "w2_" + fmt.LOWRANK_UP: ((num_experts, hidden_size, r2), lowrank_dtype),
        }
        for name, (shape, dtype) in shapes.items():
            param = nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
            param.weight_loader = self._load
            layer.register_parameter(name, param)

    def _load(self, param, loaded_weight, weight_name: str, shard_id: str, expert_id: int, return_success=False):
        """One expert's tensor of one shard (w1 gate, w3 up, w2 down) into its slot of the stacked parameter."""
        suffix = next(s for s in fmt.ALL_SUFFIXES if weight_name.endswith(s))
        dst, src = param.data[expert_id], loaded_weight
        inter, rank_of = self.inter, self.ranks[shard_id][expert_id]
        if shard_id in ("w1", "w3"):
            row0 = 0 if shard_id == "w1" else inter
            lo = self.tp_rank * inter  # this rank's rows of the full intermediate size
            if suffix in (fmt.WEIGHT_PACKED, fmt.WEIGHT_SCALE):
                dst, src = dst.narrow(0, row0, inter), src.narrow(0, lo, inter)
            elif suffix in (fmt.LOWRANK_DOWN, fmt.LOWRANK_UP):
                col0 = 0 if self.spec.lowrank_shared or shard_id == "w1" else self.ranks["w1"][expert_id]
                if suffix == fmt.LOWRANK_DOWN:
                    dst = dst.narrow(0, col0, rank_of)
                else:
                    dst, src = dst.narrow(0, row0, inter).narrow(1, col0, rank_of), src.narrow(0, lo, inter)
        else:  # w2: the intermediate size is its input
            per_channel_scale = suffix == fmt.WEIGHT_SCALE and self.spec.weight_group_size == -1
            if suffix in (fmt.WEIGHT_PACKED, fmt.WEIGHT_SCALE, fmt.SMOOTH, fmt.LOWRANK_DOWN) and self.tp_size > 1 \
                    and not per_channel_scale:
                dim = 0 if suffix == fmt.SMOOTH else 1
                per = {fmt.WEIGHT_PACKED: inter // self.spec.pack_factor,
                       fmt.WEIGHT_SCALE: self.spec.num_groups(inter)}.get(suffix, inter)
                src = src.narrow(dim, self.tp_rank * per, per)
            if suffix == fmt.LOWRANK_DOWN:
                dst = dst.narrow(0, 0, rank_of)
            elif suffix == fmt.LOWRANK_UP:
                dst = dst.narrow(1, 0, rank_of)
        if dst.shape != src.shape:
            raise ValueError(f"ASER {self.prefix} expert {expert_id} {shard_id} {suffix}: checkpoint slice has shape "
                             f"{list(src.shape)}, expected {list(dst.shape)}")
        dst.copy_(src)
        return True if return_success else None

    def process_weights_after_loading(self, layer) -> None:
        """Each expert's w13 and w2 become two linears prepared by the kernel (rank padding stripped); on the native
        CPU kernel they are then stacked over experts, so that a step runs the layer in one call."""
        spec, shared = self.spec, self.spec.lowrank_shared
        experts = nn.ModuleList()
        for e in range(layer.w13_weight_packed.shape[0]):
            pair = nn.Module()
            g, u = self.ranks["w1"][e], self.ranks["w3"][e]
            r13 = max(g, u) if shared else g + u
            for name, in_f, out_f, rank in (("w13", self.hidden, 2 * self.inter, r13),
                                            ("w2", self.inter, self.hidden, self.ranks["w2"][e])):
                linear = nn.Module()
                linear.aser_in_features, linear.aser_out_features = in_f, out_f
                linear.aser_act_bits, linear.aser_weight_bits = spec.activation_bits, spec.weight_bits
                linear.aser_act_dtype, linear.aser_name = layer.moe_config.in_dtype, f"{self.prefix}.{e}.{name}"
                t = lambda suffix, n=name: getattr(layer, f"{n}_{suffix}").data[e]  # noqa: E731
                q = unpack_int(t(fmt.WEIGHT_PACKED), spec.weight_bits, in_f)
                down = t(fmt.LOWRANK_DOWN)[:rank] if rank else None
                up = t(fmt.LOWRANK_UP)[:, :rank] if rank else None
                self.kernel.prepare(linear, q, t(fmt.WEIGHT_SCALE), 1.0 / t(fmt.SMOOTH), down, up,
                                    spec.weight_group_size)
                pair.add_module(name, linear)
            experts.append(pair)
        for name in [n for n, _ in layer.named_parameters(recurse=False) if n.startswith(("w13_", "w2_"))]:
            delattr(layer, name)
        layer.aser_apply = self._run_experts
        native, why_not = None, ""
        if os.environ.get(PER_EXPERT_ENV_VAR) == "1":
            why_not = f"{PER_EXPERT_ENV_VAR}=1"
        elif self.kernel.name == "cpu":
            native, why_not = self.kernel.stack_experts(experts)
        if native is not None:  # the stacked copy replaces the per-expert one
            layer.aser_native_experts, layer.aser_apply = native, self._run_native
            PATHS.record(self.kernel.name, "grouped MoE", "all experts of a layer in one native call", self.prefix)
        else:
            layer.aser_experts = experts
            if why_not:
                PATHS.record(self.kernel.name, "per-expert MoE", f"fallback: {why_not}", self.prefix)
        PATHS.finished()

    def get_fused_moe_quant_config(self, layer):
        return None

    def _run_native(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return layer.aser_native_experts(x, topk_ids, topk_weights, self.activation_name)

    def _run_experts(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1).long()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(layer.aser_experts)).tolist()
        weights = topk_weights.reshape(-1)
        start = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            picks = order[start:start + count]
            start += count
            tokens = picks // k
            pair = layer.aser_experts[e]
            h = self.kernel.apply(pair.w13, x[tokens], None)
            h = self.activation(h[:, :self.inter]) * h[:, self.inter:]
            y = self.kernel.apply(pair.w2, h, None)
            out.index_add_(0, tokens, (y * weights[picks, None].to(y.dtype)).to(out.dtype))
        return out

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts=None, shared_experts_input=None):
        return torch.ops.vllm_aser.moe_experts(x, topk_weights, topk_ids, self.layer_key)


@functools.cache
def _warn_cuda_once() -> None:
    from vllm.logger import init_logger

    init_logger("vllm.aser").warning(
        "ASER MoE layers run expert by expert, with a host sync per step to count each expert's tokens: CUDA graph "
        "capture cannot record that, so serve ASER MoE models on a GPU with --enforce-eager (never run on a GPU yet)")


def _moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    layer = get_forward_context().no_compile_layers[layer_name]
    return layer.aser_apply(layer, x, topk_weights, topk_ids)


def _moe_experts_fake(x, topk_weights, topk_ids, layer_name):
    return torch.empty_like(x)


direct_register_custom_op("moe_experts", _moe_experts, [], _moe_experts_fake, target_lib=_LIB)
