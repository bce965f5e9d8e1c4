"""The MLP's inner rotation (QuaRot's R4): down_proj's input rotated at run time, its inverse folded offline.

A gated MLP computes down(act(gate(h)) * up(h)); call x the inner activation act(gate(h)) * up(h). The quantized
model runs down_proj on x D H, where D is a random +-1 per inner channel, folded into up_proj's rows
(act(g) * (-u) = -(act(g) * u), exact for any activation), and H = blockdiag(H_b) / sqrt(b) is the block-diagonal
Walsh-Hadamard transform the serving kernel applies (`input_hadamard` in the artifact). down_proj's weight becomes
W D H (D and H are their own inverses), so in full precision nothing changes; quantized, its int4 weight and its
int8 input have their outliers spread over each block of b channels. The residual rotation (offline/transform/rotation.py) cannot do this: the
inner activation is produced by a nonlinearity, so no offline matrix reaches it.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm_aser_offline.model.experts import UnfusedExperts
from vllm_aser_offline.model.model_structure import UnsupportedModelError
from vllm_aser.kernels.hadamard import block_hadamard, is_valid_block

GATED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AUTO_MAX_BLOCK = 512  # --mlp-hadamard auto: the largest power of two dividing the MLP width, at most this
SIGN_SEED_OFFSET = 0x5EED_4  # the signs' generator: --seed + this + the block index (reproducible per block)


def mlp_hadamard_block(width: int, requested: str) -> int:
    """The Hadamard block for an MLP of inner width `width` (0: none); an explicit block that does not divide the
    width is refused by name."""
    if requested == "none":
        return 0
    if requested == "auto":
        block = 1
        while block < AUTO_MAX_BLOCK and width % (2 * block) == 0:
            block *= 2
        return block if block >= 2 else 0
    block = int(requested)
    if width % block:
        raise ValueError(f"--mlp-hadamard {block}: the MLP's inner width {width} is not a multiple of it; choose a "
                         "power of two that divides it, or auto")
    return block


def why_not_rotatable(block: nn.Module) -> str | None:
    """None when the block has a plain gated MLP (gate_proj, up_proj, down_proj linears), else why not."""
    if any(isinstance(m, UnfusedExperts) for m in block.modules()):
        return "MoE experts (the per-expert MLPs are not rotated)"
    for name in GATED_MLP:
        try:
            module = block.get_submodule(name)
        except AttributeError:
            return f"no {name} (the rotation needs a gated MLP with separate gate_proj, up_proj and down_proj)"
        if not isinstance(module, nn.Linear):
            return f"{name} is a {type(module).__name__}, not a linear"
    return None


def rotate_mlp_inner(block: nn.Module, where: str, hadamard: int, gen: torch.Generator) -> dict[str, int]:
    """Fold the signs into up_proj and D H into down_proj, in place, and make down_proj see the rotated input from
    now on (a forward pre-hook, so calibration, GPTQ and the low-rank branch fit what the kernel will compute).
    Returns {down_proj's name in the block: block size}."""
    reason = why_not_rotatable(block)
    if reason is not None:
        raise UnsupportedModelError(f"--mlp-hadamard: {where}: {reason}; quantize with --mlp-hadamard none")
    if not is_valid_block(hadamard):
        raise ValueError(f"--mlp-hadamard must be a power of two >= 2, got {hadamard}")
    _, up, down = (block.get_submodule(n) for n in GATED_MLP)
    signs = torch.randint(0, 2, (up.out_features,), generator=gen).float() * 2 - 1
    with torch.no_grad():
        up.weight.mul_(signs.to(up.weight)[:, None])
        if up.bias is not None:
            up.bias.mul_(signs.to(up.bias))
        rotated = block_hadamard(down.weight.float() * signs[None, :].to(down.weight.device), hadamard)
        down.weight.copy_(rotated.to(down.weight.dtype))
    down.register_forward_pre_hook(lambda _m, args: (block_hadamard(args[0], hadamard).to(args[0].dtype),))
    return {GATED_MLP[2]: hadamard}
