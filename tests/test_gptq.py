"""GPTQ base quantizer against round-to-nearest, on random layers with correlated inputs (odd shapes)."""

from __future__ import annotations

import pytest
import torch

from vllm_aser_offline.quantize.gptq import quantize_gptq
from vllm_aser_offline.quantize.weight_quant import quantization_error, quantize_rtn
from vllm_aser_offline.quantize.whitening import damped_cholesky, output_error_energy, whitened_svd
from tests.test_reconstruction import correlated_inputs


def layer(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(out_f, in_f, generator=g)
    x = correlated_inputs(in_f, 600, seed)
    return w, x.double().t() @ x.double()


def rel_output_error(w, q, scale, group_size, gram) -> float:
    return (output_error_energy(quantization_error(w, q, scale, group_size), gram)
            / output_error_energy(w, gram)) ** 0.5


@pytest.mark.parametrize("shape", [(45, 37), (7, 130), (96, 200)])
@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_below_rtn(shape, group_size, act_order):
    w, gram = layer(*shape)
    rtn = rel_output_error(w, *quantize_rtn(w, 4, group_size), group_size, gram)
    q, scale = quantize_gptq(w, gram, 4, group_size, act_order=act_order)
    gptq = rel_output_error(w, q, scale, group_size, gram)
    assert gptq < 0.85 * rtn, (gptq, rtn)


def test_gptq_keeps_the_rtn_layout():
    """Same symmetric grid and the same scales as RTN: the artifact format and the kernels do not change."""
    w, gram = layer(33, 72)
    q, scale = quantize_gptq(w, gram, 4, 24)
    _, rtn_scale = quantize_rtn(w, 4, 24)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert int(q.abs().max()) <= 7
    assert torch.equal(scale, rtn_scale)


def test_gptq_with_reconstruction_beats_either_alone():
    w, gram = layer(64, 96, seed=3)
    rank = 8
    whitening = damped_cholesky(gram, 0.01)

    def reconstructed(q, scale) -> float:
        error = quantization_error(w, q, scale, -1)
        up, down = whitened_svd(error, whitening, rank).factors(rank)
        residual = error - up.double() @ down.double()
        return (output_error_energy(residual, gram) / output_error_energy(w, gram)) ** 0.5

    q_rtn, s_rtn = quantize_rtn(w, 4, -1)
    q_gptq, s_gptq = quantize_gptq(w, gram, 4, -1)
    gptq_alone = rel_output_error(w, q_gptq, s_gptq, -1, gram)
    rtn_with_lowrank = reconstructed(q_rtn, s_rtn)
    both = reconstructed(q_gptq, s_gptq)
    assert both < gptq_alone and both < rtn_with_lowrank, (both, gptq_alone, rtn_with_lowrank)


def test_gptq_is_deterministic():
    w, gram = layer(40, 56, seed=5)
    a = quantize_gptq(w, gram, 4, -1)
    b = quantize_gptq(w.clone(), gram.clone(), 4, -1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_frozen_columns_stay_zero_and_dead_channels_are_rounded():
    w, gram = layer(24, 40, seed=7)
    frozen = torch.tensor([3, 17, 39])
    w[:, frozen] = 0.0
    gram[5, :] = 0.0
    gram[:, 5] = 0.0  # channel 5 never seen in calibration
    q, scale = quantize_gptq(w, gram, 4, -1, frozen=frozen)
    assert int(q[:, frozen].abs().max()) == 0
    # an unseen channel gets no error feedback: its codes are plain rounding of the original weight
    assert torch.equal(q[:, 5], torch.clamp(torch.round(w[:, 5] / scale[:, 0]), -7, 7).to(torch.int8))


def test_gptq_rejects_a_mismatched_hessian():
    w, gram = layer(8, 16)
    with pytest.raises(ValueError, match="does not match"):
        quantize_gptq(w, gram[:8, :8], 4, -1)


@pytest.mark.parametrize("group_size", [-1, 16])
def test_clipped_scales_lower_the_weighted_rounding_error(group_size):
    """The mse clip search includes the absmax scale, so it is never worse on its own objective, and on
    Gaussian weights (long tails) it is clearly better; the output error follows."""
    from vllm_aser_offline.quantize.weight_quant import choose_scales

    w, gram = layer(64, 200, seed=9)
    importance = gram.diagonal()

    def weighted(q, scale):
        return float((quantization_error(w, q, scale, group_size).pow(2) * importance.double()).sum())

    plain = quantize_rtn(w, 4, group_size)
    clipped = quantize_rtn(w, 4, group_size, importance)
    assert weighted(*clipped) < 0.9 * weighted(*plain)
    assert bool((clipped[1] <= plain[1] + 1e-7).all())  # clipping only shrinks scales
    assert rel_output_error(w, *clipped, group_size, gram) < rel_output_error(w, *plain, group_size, gram)
    assert torch.equal(choose_scales(w, 4, group_size), plain[1])


def test_gptq_with_clipped_scales():
    w, gram = layer(48, 120, seed=4)
    plain = rel_output_error(w, *quantize_gptq(w, gram, 4, -1), -1, gram)
    clipped = rel_output_error(w, *quantize_gptq(w, gram, 4, -1, clip=True), -1, gram)
    assert clipped < plain


@pytest.mark.parametrize("width", [1, 7, 33, 130])
def test_inverse_hessian_factor_is_the_upper_cholesky_of_the_inverse(width):
    """Given the Hessian in reversed order: R upper, R^T R = (H + damping)^-1, positive diagonal."""
    from vllm_aser_offline.quantize.gptq import _inverse_hessian_factor

    _, gram = layer(3, width, seed=width)
    damp = 0.01
    upper = _inverse_hessian_factor(gram.flip(0, 1), damp)
    damped = gram + damp * gram.diagonal().mean() * torch.eye(width, dtype=gram.dtype)
    assert torch.equal(upper, upper.triu())
    assert (upper.diagonal() > 0).all()
    oracle = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    assert torch.allclose(upper, oracle, rtol=1e-8, atol=1e-10 * float(oracle.abs().max()))
