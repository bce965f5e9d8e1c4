"""Torch reference simulation of ASER linears inside a Hugging Face model.

Used twice: during quantization (block k is calibrated on the outputs of the already-quantized blocks) and
to load a finished ASER directory as the oracle that vLLM's output is compared with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from vllm_aser_offline.model.experts import unfuse_stack_experts
from vllm_aser_offline.model.model_structure import find_decoder_stack
from vllm_aser_offline.model.source_model import checkpoint_naming
from vllm_aser import format as fmt
from vllm_aser.kernels.reference import aser_linear, dequantize_weight, unpack_int


class ReferenceASERLinear(nn.Module):
    """y = Q_a(x / s) W_q^T + ((x / s) down^T) up^T + b, in float32 (buffers are not saved)."""

    def __init__(self, weight, inv_smooth, down, up, bias, act_bits: int, hadamard: int = 0):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.act_bits = act_bits
        self.hadamard = hadamard  # input Hadamard block (0: none)
        self.register_buffer("weight", weight.float(), persistent=False)
        self.register_buffer("inv_smooth", inv_smooth.float(), persistent=False)
        self.register_buffer("down", None if down is None else down.float(), persistent=False)
        self.register_buffer("up", None if up is None else up.float(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aser_linear(x, self.weight, self.inv_smooth, self.down, self.up, self.bias, self.act_bits,
                           self.hadamard)


def truncate_lowrank(model: nn.Module, rank: int) -> int:
    """Keep the first `rank` components of every low-rank branch; return how many branches were cut.

    aser-quantize orders the factors by singular value, so the first r components are the rank-r
    reconstruction of the same calibration run: one artifact at a high rank gives a whole rank sweep.
    """
    if rank < 0:
        raise ValueError(f"--lowrank-rank must be >= 0, got {rank}")
    cut = 0
    for module in model.modules():
        if isinstance(module, ReferenceASERLinear) and module.down is not None and module.down.shape[0] > rank:
            module.down = module.down[:rank].contiguous() if rank else None
            module.up = module.up[:, :rank].contiguous() if rank else None
            cut += 1
    return cut


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def load_reference_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build the HF model of an ASER directory with ReferenceASERLinear in place of each quantized linear."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    cfg = fmt.read_quant_config(model_dir)
    fmt.validate_checkpoint(model_dir, cfg)
    hf_config = AutoConfig.from_pretrained(model_dir)
    if hasattr(hf_config, "quantization_config"):
        delattr(hf_config, "quantization_config")
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    # the files use the checkpoint's names (per-expert linears, Mixtral's block_sparse_moe); the model, its own
    checkpoint_name = checkpoint_naming(model)
    unfuse_stack_experts(find_decoder_stack(model), checkpoint_name, list(tensors))
    module_of = {checkpoint_name(name): name for name, _ in model.named_modules()}
    param_of = {checkpoint_name(name): name for name in model.state_dict()}
    for module, rank in cfg.ranks.items():
        get = lambda suffix: tensors.pop(fmt.tensor_name(module, suffix))  # noqa: E731
        shape = get(fmt.WEIGHT_SHAPE).tolist()
        q = unpack_int(get(fmt.WEIGHT_PACKED), cfg.weight_bits, shape[1])
        weight = dequantize_weight(q, get(fmt.WEIGHT_SCALE), cfg.weight_group_size)
        down = get(fmt.LOWRANK_DOWN) if rank else None
        up = get(fmt.LOWRANK_UP) if rank else None
        bias = tensors.pop(f"{module}.bias", None)
        linear = ReferenceASERLinear(weight, 1.0 / get(fmt.SMOOTH), down, up, bias, cfg.activation_bits,
                                     cfg.hadamard_of(module))
        set_submodule(model, module_of.get(module, module), linear)
    tensors = {param_of.get(name, name): tensor for name, tensor in tensors.items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise fmt.FormatError(f"{model_dir}: tensors not used by the model: {unexpected[:5]}")
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if missing:
        raise fmt.FormatError(f"{model_dir}: tensors missing from the checkpoint: {missing[:5]}")
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
