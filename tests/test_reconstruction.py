"""Whitening SVD, error curves, rank rules: the numerical core of error reconstruction."""

from __future__ import annotations

import pytest
import torch

from vllm_aser_offline.quantize.layer_quant import error_curve
from vllm_aser_offline.quantize.rank_allocation import LayerSpectrum, allocate_budget, energy_rank, pad_rank
from vllm_aser_offline.quantize.weight_quant import quantization_error, quantize_rtn
from vllm_aser_offline.quantize.whitening import ActivationStats, damped_cholesky, output_error_energy, plain_svd, whitened_svd


def correlated_inputs(in_features: int, tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) / in_features**0.5
    scales = torch.logspace(0, 1.5, in_features)[torch.randperm(in_features, generator=g)]
    return (torch.randn(tokens, in_features, generator=g) @ mix) * scales


@pytest.fixture
def layer():
    torch.manual_seed(0)
    out_f, in_f = 45, 37
    w = torch.randn(out_f, in_f)
    x = correlated_inputs(in_f, 400)
    stats = ActivationStats(in_f)
    stats.update(x[:150])
    stats.update(x[150:])
    q, scale = quantize_rtn(w, 4, -1)
    return w, x, stats, quantization_error(w, q, scale, -1)


def test_gram_streaming_equals_batch(layer):
    _, x, stats, _ = layer
    # each batch's product is float32 by design (speed), then summed in float64: compare at float32 precision
    # relative to the Gram's scale (entries near zero cancel; their error depends on the CPU's GEMM blocking)
    exact = x.double().t() @ x.double()
    assert (stats.gram - exact).abs().max() <= 1e-5 * exact.abs().max()
    assert torch.allclose(stats.act_max, x.abs().amax(0))
    assert stats.tokens == 400


def test_wide_gram_in_symmetric_blocks_equals_batch():
    """Inputs wider than 2 * GRAM_BLOCK take the blocked path (the 8960-wide down_proj of a 1.5B model)."""
    from vllm_aser_offline.quantize.whitening import GRAM_BLOCK

    width = 2 * GRAM_BLOCK + 37  # the last block takes an odd remainder
    x = torch.randn(64, width, generator=torch.Generator().manual_seed(3)) * torch.logspace(0, 1, width)
    stats = ActivationStats(width)
    stats.update(x[:40])
    stats.update(x[40:])
    exact = x.double().t() @ x.double()
    assert torch.equal(stats.gram, stats.gram.t())
    assert (stats.gram - exact).abs().max() <= 1e-5 * exact.abs().max()


@pytest.mark.parametrize("shape", [(45, 37), (7, 33), (33, 7), (1, 20), (64, 64)])
def test_whitened_factors_match_an_svd_of_the_whitened_error(shape):
    """The eigendecomposition route against the oracle (torch's SVD of E S) on both sides of square."""
    g = torch.Generator().manual_seed(shape[0] * 100 + shape[1])
    x = correlated_inputs(shape[1], 300, seed=shape[0])
    stats = ActivationStats(shape[1])
    stats.update(x)
    error = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.01
    whitening = damped_cholesky(stats.gram, 0.01)
    u, s, vh = torch.linalg.svd(error @ whitening, full_matrices=False)
    spectrum = whitened_svd(error, whitening, max_rank=16)
    k = min(16, *shape)
    assert spectrum.max_rank == k
    assert torch.allclose(spectrum.singular_values.double(), s, rtol=1e-5, atol=1e-6 * float(s[0]))
    for rank in (1, k // 2, k):
        up, down = spectrum.factors(rank)
        oracle = (u[:, :rank] * s[:rank]) @ torch.linalg.solve_triangular(whitening.t(), vh[:rank].t(), upper=True).t()
        got = up.double() @ down.double()
        assert (got - oracle).norm() <= 1e-5 * max(float(oracle.norm()), 1e-12)


@pytest.mark.parametrize("rank", [1, 5, 16])
def test_whitened_svd_removes_exactly_the_predicted_error(layer, rank):
    """Undamped: ||(E - up_r down_r) X||^2 equals the sum of the discarded squared singular values."""
    _, x, stats, error = layer
    spectrum = whitened_svd(error, damped_cholesky(stats.gram, 0.0), max_rank=64)
    up, down = spectrum.factors(rank)
    residual = (error - up.double() @ down.double()) @ x.double().t()
    predicted = spectrum.singular_values[rank:].double().pow(2).sum()
    assert torch.allclose(residual.pow(2).sum(), predicted, rtol=1e-4)


@pytest.mark.parametrize("rank", [2, 8])
def test_whitening_beats_plain_svd_at_equal_rank(layer, rank):
    _, x, stats, error = layer
    whitened = whitened_svd(error, damped_cholesky(stats.gram, 0.01), rank).factors(rank)
    plain = plain_svd(error, rank).factors(rank)
    out_err = lambda f: ((error - f[0].double() @ f[1].double()) @ x.double().t()).norm()  # noqa: E731
    assert out_err(whitened) < 0.9 * out_err(plain)


def test_error_curve_matches_direct_computation(layer):
    w, _, stats, error = layer
    spectrum = whitened_svd(error, damped_cholesky(stats.gram, 0.01), 20)
    ref = output_error_energy(w, stats.gram)
    curve = error_curve(error, stats.gram, spectrum, ref)
    assert curve.shape == (21,)
    for r in (0, 3, 20):
        up, down = spectrum.factors(r)
        direct = (output_error_energy(error - up.double() @ down.double(), stats.gram) / ref) ** 0.5
        assert float(curve[r]) == pytest.approx(direct, rel=1e-6)
    assert bool((curve[1:] <= curve[:-1] + 1e-12).all())


def test_singular_gram_is_damped_not_fatal():
    x = torch.randn(5, 20)  # 5 tokens, 20 channels: rank 5
    stats = ActivationStats(20)
    stats.update(x)
    factor = damped_cholesky(stats.gram, 0.0)
    assert torch.isfinite(factor).all()


def test_rank_rules():
    assert [pad_rank(r, 100) for r in (0, 1, 8, 9)] == [0, 8, 8, 16]
    assert pad_rank(50, 20) == 20
    sv = torch.tensor([3.0, 2.0, 1.0, 0.5])  # energies 9, 4, 1, .25 of 14.25
    assert energy_rank(sv, 0.6) == 1
    assert energy_rank(sv, 0.9) == 2
    assert energy_rank(sv, 1.0) == 4


def test_budget_goes_where_the_error_is():
    flat = LayerSpectrum("flat", 64, 64, torch.full((64,), 0.1), 1.0, 64)
    steep = LayerSpectrum("steep", 64, 64, torch.linspace(5, 0.01, 64), 1.0, 64)
    ranks = allocate_budget([flat, steep], budget_percent=25)
    spent = sum(r * 128 for r in ranks.values())
    assert spent <= 0.25 * 2 * 64 * 64
    assert ranks["steep"] > ranks["flat"]
    assert all(r % 8 == 0 for r in ranks.values())
