"""Rank rules for the low-rank branch: fixed, energy fraction, and a global parameter budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

RANK_MULTIPLE = 8


def pad_rank(rank: int, limit: int) -> int:
    """Round up to a multiple of 8 (kernel-friendly), never past the matrix's own rank."""
    if rank <= 0:
        return 0
    return min(-(-rank // RANK_MULTIPLE) * RANK_MULTIPLE, limit)


def energy_rank(singular_values: torch.Tensor, fraction: float) -> int:
    """Smallest r whose components hold `fraction` of the (whitened) error energy."""
    energy = singular_values.double().pow(2)
    total = float(energy.sum())
    if total <= 0:
        return 0
    cumulative = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=torch.float64)).item()) + 1


def provisional_budget_rank(budget_percent: float, out_features: int, in_features: int) -> int:
    """The uniform rank that spends `budget_percent` on this layer (used before global allocation)."""
    return int(budget_percent / 100 * out_features * in_features / (out_features + in_features))


@dataclass
class LayerSpectrum:
    name: str
    out_features: int
    in_features: int
    singular_values: torch.Tensor  # of the whitened error, descending
    reference_energy: float  # ||W X||^2 of the layer: makes errors of different layers comparable
    max_rank: int
    min_rank: int = 0  # e.g. room for extracted outlier columns, which only the low-rank branch carries


def allocate_budget(layers: list[LayerSpectrum], budget_percent: float) -> dict[str, int]:
    """Spend `budget_percent` extra parameters (of all quantized weights) where they remove the most error.

    Each layer first gets its `min_rank` (even past the budget). Then units of 8 components are ranked by relative
    output error removed per parameter; within a layer the units come in descending order, so greedy selection
    yields prefixes (valid ranks) automatically.
    """
    total_params = sum(layer.out_features * layer.in_features for layer in layers)
    budget = budget_percent / 100 * total_params
    ranks = {layer.name: layer.min_rank for layer in layers}
    spent = float(sum(layer.min_rank * (layer.out_features + layer.in_features) for layer in layers))
    units: list[tuple[float, int, str]] = []
    for layer in layers:
        energy = layer.singular_values.double().pow(2)[: layer.max_rank]
        cost = RANK_MULTIPLE * (layer.out_features + layer.in_features)
        for start in range(layer.min_rank, layer.max_rank - RANK_MULTIPLE + 1, RANK_MULTIPLE):
            removed = float(energy[start : start + RANK_MULTIPLE].sum())
            gain = removed / max(layer.reference_energy, 1e-30)  # relative output error: every layer alike
            units.append((gain / cost, cost, layer.name))
    units.sort(key=lambda u: -u[0])
    for _, cost, name in units:
        if spent + cost > budget:
            continue
        ranks[name] += RANK_MULTIPLE
        spent += cost
    return ranks
