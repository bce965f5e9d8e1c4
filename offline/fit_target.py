"""Fit the full-precision model's outputs instead of each layer's own (asymmetric calibration, as in GPTAQ).

A layer of the quantized model receives X_q (rows: tokens), the full-precision model's copy X_f. Fitting the
full-precision output, min_A ||X_f W^T - X_q A^T||, is the same problem as min_A ||X_q (W* - A)^T|| (up to a
constant) for the least-squares weight W* = W C H^-1, C = X_f^T X_q, H = X_q^T X_q. GPTQ and the whitened SVD
already minimize ||X_q (W - A)^T||, so handing them W* instead of W makes both fit the full-precision target
with no other change: the error of earlier layers gets compensated where it lands.

W* is computed as W + W (C - H) (H + lambda I)^-1: the damping shrinks the correction, never the weight.
"""

from __future__ import annotations

import torch

from offline.whitening import damped_cholesky


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


def target_weight(weight: torch.Tensor, cross: torch.Tensor, gram: torch.Tensor, damp: float) -> torch.Tensor:
    """W* = W + W (C - H) (H + lambda I)^-1 (see the module docstring), float32 [out, in]."""
    factor = damped_cholesky(gram, damp)
    w = weight.double()
    rhs = (w @ (cross - gram)).t()  # [in, out]; H symmetric, so X (H + lambda I) = R  <=>  (H + lambda I) X^T = R^T
    return (w + torch.cholesky_solve(rhs, factor).t()).float()
