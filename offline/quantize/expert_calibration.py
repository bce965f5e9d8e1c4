"""MoE experts' calibration: each expert from the tokens routed to it, and the stated rule for the experts the
calibration text rarely reaches (offline/model/experts.py holds the unfused experts themselves)."""

from __future__ import annotations

from vllm_aser_offline.model.experts import UnfusedExperts
from vllm_aser_offline.model.model_structure import InputHooks, run_block
from vllm_aser_offline.options import QuantizeOptions
from vllm_aser_offline.quantize.whitening import ActivationStats


def new_stats(block, group: list[str]) -> ActivationStats:
    return ActivationStats(block.get_submodule(group[0]).in_features)


def recalibrate_starved_experts(block, block_prefix: str, stats: dict, inputs, opts: QuantizeOptions) -> list[dict]:
    """Experts routed fewer calibration tokens than `opts.moe_min_tokens` (default: their input width, below
    which their Gram matrix is singular) are calibrated again on every token that enters their MoE layer, as
    if routed to them. Returns one report entry per such expert."""
    starved, keys = [], []
    for name, experts in block.named_modules():
        if not isinstance(experts, UnfusedExperts):
            continue
        groups = experts.groups(name)
        for e in range(experts.num_experts):
            gate_up, down = tuple(groups[2 * e]), tuple(groups[2 * e + 1])
            routed = stats[gate_up].tokens
            needed = stats[gate_up].gram.shape[0] if opts.moe_min_tokens is None else opts.moe_min_tokens
            if routed < needed:
                experts.calibrate_on_all.add(e)
                keys += [gate_up, down]
                starved.append({"expert": f"{block_prefix}.{name}.{e}", "routed_tokens": routed})
    if not starved:
        return []
    for key in keys:
        stats[key] = new_stats(block, list(key))
    try:
        with InputHooks(block, [list(k) for k in keys], lambda key, x: stats[key].update(x)):
            for hidden, kwargs in inputs:
                run_block(block, hidden, kwargs)
    finally:
        for experts in block.modules():
            if isinstance(experts, UnfusedExperts):
                experts.calibrate_on_all.clear()
    return starved


def moe_report(source, starved: list[dict], opts: QuantizeOptions) -> dict | None:
    """How the experts were calibrated: each from its routed tokens, except the starved ones listed."""
    if not source.unfused_experts:
        return None
    return {
        "expert_collections_per_block": [source.checkpoint_name(f"{source.stack.prefix}.*.{n}")
                                         for n in source.unfused_experts],
        "min_routed_tokens": "input width" if opts.moe_min_tokens is None else opts.moe_min_tokens,
        "rule": "an expert routed fewer calibration tokens than min_routed_tokens is calibrated on every token "
                "entering its MoE layer, as if routed to it",
        "starved_experts": starved,
    }
