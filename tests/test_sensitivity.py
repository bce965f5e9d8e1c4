"""--rank-weight fisher: output sensitivities from one backward pass, and the budget they steer."""

from __future__ import annotations

import torch

from offline.rank_allocation import LayerSpectrum, allocate_budget
from offline.sensitivity import output_sensitivity, unit_sensitivity


def test_sensitivity_is_the_mean_squared_output_gradient(tiny_llama):
    """Against autograd on the same loss: the hook's value for one linear equals mean(grad^2) at its output."""
    from transformers import AutoModelForCausalLM

    windows = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    measured = output_sensitivity(tiny_llama, windows, progress=False)
    assert len(measured) == 7 * 2  # q k v o gate up down in each of the 2 blocks (the head is not a target)
    assert all(v > 0 for v in measured.values())

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    name = "model.layers.1.mlp.down_proj"
    grads = []
    for window in windows.split(1):
        out = {}
        handle = model.get_submodule(name).register_forward_hook(lambda m, i, o: out.setdefault("y", o))
        loss = model(input_ids=window, labels=window).loss
        handle.remove()
        grads.append(torch.autograd.grad(loss, out["y"])[0])
    expected = sum(float(g.double().pow(2).sum()) for g in grads) / sum(g.numel() for g in grads)
    assert abs(measured[name] / expected - 1) < 1e-6


def test_units_weigh_their_members_by_output_width():
    s = {"q": 1.0, "k": 4.0, "v": 2.0}
    assert unit_sensitivity([("q", 64), ("k", 16), ("v", 16)], s) == (64 * 1 + 16 * 4 + 16 * 2) / 96
    assert unit_sensitivity([("q", 64), ("expert.0", 16)], s) is None


def test_sensitivity_moves_the_budget_to_the_layer_the_loss_cares_about():
    """Two layers with identical error spectra: the relative rule splits the budget evenly, the sensitivity
    rule gives it to the layer whose output the loss is 10x more sensitive to."""
    sv = torch.linspace(2.0, 0.1, 32)

    def layers(s_a, s_b):
        return [LayerSpectrum("a", 64, 64, sv, 100.0, 32, sensitivity=s_a),
                LayerSpectrum("b", 64, 64, sv, 100.0, 32, sensitivity=s_b)]

    budget = 100 * 16 * 128 / (2 * 64 * 64)  # room for 16 components in all
    assert allocate_budget(layers(None, None), budget) == {"a": 8, "b": 8}
    assert allocate_budget(layers(1.0, 10.0), budget) == {"a": 0, "b": 16}
