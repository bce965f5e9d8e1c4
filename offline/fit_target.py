"""Fit the full-precision model's outputs instead of each layer's own (asymmetric calibration, as in GPTAQ).

A layer of the quantized model receives X_q (rows: tokens), the full-precision model's copy X_f. Fitting the
full-precision output, min_A ||X_f W^T - X_q A^T||, is the same problem as min_A ||X_q (W* - A)^T|| (up to a
constant) for the least-squares weight W* = W C H^-1, C = X_f^T X_q, H = X_q^T X_q. GPTQ and the whitened SVD
already minimize ||X_q (W - A)^T||, so handing them W* instead of W makes both fit the full-precision target
with no other change: the error of earlier layers gets compensated where it lands.

W* is computed as W + W (C - H) (H + lambda I)^-1: the ridge shrinks the correction, never the weight. The
correction overfits the calibration tokens: on SmolLM2-135M (16 windows of 512 tokens to fit, 32 held out, blocks
1-4) a ridge of 1% of the mean diagonal (the GPTQ damping) cut the fitted output error to 0.46-0.77x but left
the held-out one at 0.75-1.25x (down_proj worst); a ridge of 1x the mean diagonal gave 0.62-0.89x fitted and
0.84-0.99x held out. FIT_RIDGE is that 1x.
"""

from __future__ import annotations

import torch

from offline.whitening import damped_cholesky

FIT_RIDGE = 1.0  # lambda, as a fraction of the mean diagonal of H


class CrossStats:
    """Streams C = X_f^T X_q for one shared-input group (float32 GEMMs summed in float64)."""

    def __init__(self, in_features: int):
        self.cross = torch.zeros(in_features, in_features, dtype=torch.float64)

    def update(self, x_fp: torch.Tensor, x_q: torch.Tensor) -> None:
        xf = x_fp.reshape(-1, x_fp.shape[-1]).float()
        xq = x_q.reshape(-1, x_q.shape[-1]).float()
        if xf.shape != xq.shape:
            raise ValueError(f"full-precision and quantized inputs differ in shape: {tuple(xf.shape)} vs "
                             f"{tuple(xq.shape)}")
        self.cross += (xf.t() @ xq).double()


def target_weights(
    weights: dict[str, torch.Tensor], cross: torch.Tensor, gram: torch.Tensor, damp: float = FIT_RIDGE
) -> dict[str, torch.Tensor]:
    """W* = W + W (C - H) (H + damp * mean(diag H) I)^-1 (see the module docstring) for every weight of one
    shared-input group (one factorization), float32 [out, in]."""
    factor = damped_cholesky(gram, damp)
    shift = cross - gram
    out = {}
    for name, weight in weights.items():
        w = weight.double()
        rhs = (w @ shift).t()  # [in, out]; H symmetric, so X (H + lambda I) = R  <=>  (H + lambda I) X^T = R^T
        out[name] = (w + torch.cholesky_solve(rhs, factor).t()).float()
    return out
