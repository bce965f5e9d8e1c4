"""MoE experts held as fused 3-D parameters (transformers 5: gate_up_proj [E, 2I, H], down_proj [E, H, I])
unfused into one nn.Linear per expert projection, named as the checkpoint names them (Mixtral w1/w3/w2,
Qwen-MoE gate/up/down_proj). Each expert is then calibrated on the tokens routed to it and quantized like any
other linear; vLLM's FusedMoE reads the same per-expert names.
"""

from __future__ import annotations

import re

import torch
from torch import nn

# checkpoint leaf names of an expert's projections, by role
ROLE_LEAVES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


def is_fused_experts(module: nn.Module) -> bool:
    """transformers 5's expert collections: 3-D gate_up_proj and down_proj parameters, not gate-less variants."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
        and down.dim() == 3 and hasattr(module, "num_experts") and hasattr(module, "act_fn")
        and not getattr(module, "is_transposed", False) and getattr(module, "has_gate", True)
        and not getattr(module, "has_bias", False)
    )


def expert_leaves(checkpoint_names: list[str], experts_prefix: str) -> dict[str, str]:
    """Role -> leaf name, read off the checkpoint's tensor names for expert 0 under `experts_prefix`."""
    pattern = re.compile(re.escape(experts_prefix) + r"\.0\.(\w+)\.weight(_packed)?$")  # source or ASER
    found = {m.group(1) for name in checkpoint_names if (m := pattern.match(name))}
    leaves = {}
    for role, names in ROLE_LEAVES.items():
        hits = [n for n in names if n in found]
        if len(hits) != 1:
            raise ValueError(
                f"{experts_prefix}: the checkpoint's expert tensors {sorted(found) or 'none'} do not name one "
                f"{role} projection ({' or '.join(names)})"
            )
        leaves[role] = hits[0]
    return leaves


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), its linears named by the checkpoint's leaves."""

    def __init__(self, leaves: dict[str, str], hidden: int, intermediate: int, act_fn, dtype, device):
        super().__init__()
        self.leaves, self.act_fn = leaves, act_fn
        sizes = {"gate": (hidden, intermediate), "up": (hidden, intermediate), "down": (intermediate, hidden)}
        for role, (fan_in, fan_out) in sizes.items():
            self.add_module(leaves[role], nn.Linear(fan_in, fan_out, bias=False, dtype=dtype, device=device))

    def linear(self, role: str) -> nn.Linear:
        return getattr(self, self.leaves[role])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear("down")(self.act_fn(self.linear("gate")(x)) * self.linear("up")(x))


class UnfusedExperts(nn.Module):
    """Drop-in for a fused expert collection: forward(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]).

    Experts in `calibrate_on_all` run on every token (their output still uses only the routed rows), so that
    an expert the calibration text rarely reaches is calibrated on all the tokens entering the layer.
    """

    def __init__(self, fused: nn.Module, leaves: dict[str, str]):
        super().__init__()
        self.num_experts = int(fused.num_experts)
        _, two_inter, hidden = fused.gate_up_proj.shape
        self.leaves = leaves
        self.calibrate_on_all: set[int] = set()
        for e in range(self.num_experts):
            self.add_module(str(e), ExpertMLP(leaves, hidden, two_inter // 2, fused.act_fn,
                                              fused.gate_up_proj.dtype, fused.gate_up_proj.device))
        if not fused.gate_up_proj.is_meta:
            self.load_fused(fused.gate_up_proj.detach(), fused.down_proj.detach())

    def expert(self, index: int) -> ExpertMLP:
        return self.get_submodule(str(index))

    def load_fused(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        inter = gate_up.shape[1] // 2
        with torch.no_grad():
            for e in range(self.num_experts):
                mlp = self.expert(e)
                mlp.linear("gate").weight.copy_(gate_up[e, :inter])
                mlp.linear("up").weight.copy_(gate_up[e, inter:])
                mlp.linear("down").weight.copy_(down[e])

    def groups(self, prefix: str) -> list[list[str]]:
        """Shared-input groups of every expert (gate with up, down alone), routed tokens or not."""
        out = []
        for e in range(self.num_experts):
            leaf = self.leaves
            out.append([f"{prefix}.{e}.{leaf['gate']}", f"{prefix}.{e}.{leaf['up']}"])
            out.append([f"{prefix}.{e}.{leaf['down']}"])
        return out

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == e)
            if e in self.calibrate_on_all:
                routed = self.expert(e)(hidden_states)[token_idx]
            elif token_idx.numel():
                routed = self.expert(e)(hidden_states[token_idx])
            else:
                continue
            out.index_add_(0, token_idx, (routed * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out


def unfuse_experts(block: nn.Module, checkpoint_names: list[str] | None, checkpoint_prefix) -> list[str]:
    """Replace every fused expert collection in `block` by UnfusedExperts (in place); return their names.
    `checkpoint_prefix(name)` maps a module name inside the block to its checkpoint prefix."""
    replaced = []
    for name, module in list(block.named_modules()):
        if not is_fused_experts(module):
            continue
        if checkpoint_names is None:  # no per-expert tensors to read the names from: the common convention
            leaves = {role: names[0] for role, names in ROLE_LEAVES.items()}
        else:
            leaves = expert_leaves(checkpoint_names, checkpoint_prefix(name))
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, child, UnfusedExperts(module, leaves))
        replaced.append(name)
    return replaced


def unfuse_stack_experts(stack, checkpoint_name, stored: list[str] | None) -> list[str]:
    """unfuse_experts on every block of the decoder stack; the names replaced in block 0."""
    names: list[str] = []
    for index, layer in enumerate(stack.layers):
        prefix = f"{stack.prefix}.{index}"
        replaced = unfuse_experts(layer, stored, lambda n, p=prefix: checkpoint_name(f"{p}.{n}"))
        if index == 0:
            names = replaced
    return names
