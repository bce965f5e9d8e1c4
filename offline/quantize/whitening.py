"""Calibration statistics and the whitening SVD of the quantization error (ASER's error reconstruction).

With G = X X^T = S S^T, ||E X||_F = ||E S||_F, so the SVD of E S gives the rank-r compensator that is optimal
for the *output* error on calibration data, not for the weight error (plain SVD, LoRC).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRAM_BLOCK = 2048  # inputs at least twice this wide get their Gram matrix in symmetric blocks


class ActivationStats:
    """Streams a linear's inputs: Gram matrix and per-channel max |x|.

    Each batch's X^T X is a float32 GEMM (half the time of float64 on CPU, about 2e-7 relative error at 4k
    tokens); the batches are summed in float64 so the error does not grow with the calibration size.
    """

    def __init__(self, in_features: int):
        self.gram = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.act_max = torch.zeros(in_features, dtype=torch.float32)
        self.tokens = 0

    def update(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).detach()
        self.act_max = torch.maximum(self.act_max, x2.abs().amax(dim=0).float())
        xf = x2.float()
        n = xf.shape[1]
        if n < 2 * GRAM_BLOCK:
            self.gram += (xf.t() @ xf).double()
        else:  # only the blocks on and above the diagonal: 10 of 16 products for an 8960-wide down_proj input
            edges = [*range(0, n - GRAM_BLOCK // 2, GRAM_BLOCK), n]  # the last block takes the remainder
            spans = list(zip(edges[:-1], edges[1:]))
            for i, (a0, a1) in enumerate(spans):
                left = xf[:, a0:a1].t()
                for b0, b1 in spans[i:]:
                    block = (left @ xf[:, b0:b1]).double()
                    self.gram[a0:a1, b0:b1] += block
                    if b0 != a0:
                        self.gram[b0:b1, a0:a1] += block.t()
        self.tokens += x2.shape[0]

    def smoothed_gram(self, smooth: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """Gram matrix of x / smooth. `in_place` scales the stored matrix itself (no copy: 0.6 GiB for an
        8960-wide input) when the caller needs only the smoothed one from then on."""
        inv = 1.0 / smooth.double()
        if in_place:
            return self.gram.mul_(inv[:, None]).mul_(inv[None, :])
        return self.gram * inv[:, None] * inv[None, :]


def damped_cholesky(gram: torch.Tensor, damp: float) -> torch.Tensor:
    """Lower-triangular S with S S^T = G + lambda * mean(diag(G)) * I.

    A singular Gram matrix (dead channels, fewer tokens than channels) is not fatal: damping grows tenfold
    until the factorization succeeds.
    """
    diag_mean = gram.diagonal().mean().clamp(min=1e-12)
    lam = damp
    for _ in range(12):
        damped = gram.clone()
        damped.diagonal().add_(lam * diag_mean)
        factor, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            return factor
        lam = max(lam * 10, 1e-8)
    raise RuntimeError("Gram matrix could not be factorized even with heavy damping (NaN in activations?)")


@dataclass
class LowRankSpectrum:
    """Rank-ordered factors of an error matrix: error ~= up[:, :r] @ down[:r] for any r <= max_rank."""

    up: torch.Tensor  # [out, max_rank] = U Sigma
    down: torch.Tensor  # [max_rank, in]
    singular_values: torch.Tensor  # all of them (their squares are the removable output-error energy)

    @property
    def max_rank(self) -> int:
        return self.up.shape[1]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.up[:, :rank].contiguous(), self.down[:rank].contiguous()


def whitened_svd(error: torch.Tensor, whitening: torch.Tensor, max_rank: int) -> LowRankSpectrum:
    """SVD of P = E S; up = U_r Sigma_r, down = V_r^T S^-1 (= Sigma_r^-1 U_r^T E).

    Computed from the eigendecomposition of the smaller of P P^T and P^T P instead of an SVD of P: on the
    1536 x 8960 errors of a 1.5B model's down_proj the SVD was 13% of the quantizer's time. Squaring the matrix
    only blurs singular values below sqrt(eps) of the largest, whose energy the budget counts as noise anyway;
    the factors of the kept components come out as accurate as the SVD's (tests/test_reconstruction.py).
    """
    p = error.double() @ whitening
    m, n = p.shape
    k = min(max_rank, m, n)
    if m <= n:
        evals, u = torch.linalg.eigh(p @ p.t())
        order = torch.argsort(evals, descending=True)
        s = evals[order].clamp(min=0).sqrt()
        u = u[:, order[:k]]
        inv = torch.where(s[:k] > s[0] * 1e-12, 1.0 / s[:k].clamp(min=1e-300), torch.zeros_like(s[:k]))
        down = (u.t() @ error.double()) * inv[:, None]
        up = u * s[:k]
    else:
        evals, v = torch.linalg.eigh(p.t() @ p)
        order = torch.argsort(evals, descending=True)
        s = evals[order].clamp(min=0).sqrt()
        v = v[:, order[:k]]
        up = p @ v  # = U_k Sigma_k
        # down = V_k^T S^-1  <=>  S^T down^T = V_k
        down = torch.linalg.solve_triangular(whitening.t(), v, upper=True).t()
    return LowRankSpectrum(up=up.float(), down=down.float(), singular_values=s.float())


def plain_svd(error: torch.Tensor, max_rank: int) -> LowRankSpectrum:
    """LoRC-style SVD of the weight error itself (ignores which inputs matter)."""
    u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
    k = min(max_rank, s.shape[0])
    return LowRankSpectrum(up=(u[:, :k] * s[:k]).float(), down=vh[:k].float(), singular_values=s.float())


def output_error_energy(error: torch.Tensor, gram: torch.Tensor) -> float:
    """||E X||_F^2 = tr(E G E^T), exact from the Gram matrix."""
    e = error.double()
    return float(((e @ gram) * e).sum())
