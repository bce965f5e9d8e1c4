"""GPTQ-style base quantizer: round one column at a time and push its output error onto the columns not yet
rounded, weighted by the inverse Hessian (Frantar et al., 2022).

The Hessian is the calibration Gram matrix the whitening already holds (of the smoothed input), so GPTQ needs no
second calibration pass. The result has RTN's exact layout (symmetric int grid, per-channel or per-group scales
along the stored column order), so the artifact and the vLLM kernels do not change.
"""

from __future__ import annotations

import torch

from vllm_aser_offline.quantize.weight_quant import choose_scales


def _inverse_hessian_factor(reversed_hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor R of H^-1 (H^-1 = R^T R; H damped by damp * mean diagonal, grown tenfold until it
    factorizes), given J H J, H in reversed order, which it damps in place.

    J H J = L L^T gives R = J L^-1 J: one Cholesky and one triangular inverse instead of Cholesky, inverse and a
    second Cholesky (11% of the quantizer's time on a 1.5B model's 8960-wide layers), and few n x n temporaries.
    """
    diagonal = reversed_hessian.diagonal()
    diag_mean = diagonal.mean().clamp(min=1e-12)
    lam, added = max(damp, 1e-6), 0.0
    for _ in range(12):
        diagonal.add_(lam * diag_mean - added)
        added = lam * diag_mean
        factor, info = torch.linalg.cholesky_ex(reversed_hessian)
        if int(info) == 0:
            identity = torch.eye(factor.shape[0], dtype=factor.dtype)
            upper = torch.linalg.solve_triangular(factor, identity, upper=False)
            del identity, factor
            upper = upper.flip(0, 1)
            if bool(torch.isfinite(upper).all()):
                return upper
        lam *= 10
    raise RuntimeError("GPTQ: the Hessian could not be factorized even with heavy damping (NaN in activations?)")


def quantize_gptq(
    w: torch.Tensor,
    gram: torch.Tensor,
    bits: int,
    group_size: int,
    damp: float = 0.01,
    act_order: bool = True,
    frozen: torch.Tensor | None = None,
    block_size: int = 128,
    clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in], gram [in, in] (X X^T of the layer's input) -> (q int8 [out, in], scale float32 [out, n_groups]).

    `frozen` input channels (ASER's extracted outliers) must already be zero in `w`: they are cut out of the
    Hessian, stay exactly zero, and receive no error feedback (the low-rank branch carries them).
    `act_order` rounds columns in order of decreasing Hessian diagonal; scales are fixed before the loop
    (from the weight itself), so the stored layout stays plain, with no column permutation or group index.
    """
    out_features, in_features = w.shape
    if gram.shape != (in_features, in_features):
        raise ValueError(f"GPTQ: Hessian of shape {tuple(gram.shape)} does not match weight {tuple(w.shape)}")
    qmax = 2 ** (bits - 1) - 1
    dead = gram.diagonal() <= 0
    if frozen is not None and frozen.numel():
        dead[frozen] = True
    # decoupled: no error flows into or out of these columns (channels calibration never saw are rounded
    # plainly, frozen ones stay zero); their Hessian diagonal is the mean of the others
    diagonal = gram.diagonal().double().clone()
    diagonal[dead] = diagonal[~dead].mean() if (~dead).any() else 1.0

    # scales from the (frozen-zeroed) weight, as RTN would choose them (`clip`: with the Hessian diagonal as
    # importance), fixed before any error feedback
    scale = choose_scales(w.float(), bits, group_size, gram.diagonal().clamp(min=0) if clip else None)
    scale = scale.double()
    group_of = (torch.zeros(in_features, dtype=torch.long) if group_size == -1
                else torch.arange(in_features) // group_size)

    order = torch.argsort(diagonal, descending=True, stable=True) if act_order else torch.arange(in_features)
    weight = w.double()[:, order]
    col_group = group_of[order].tolist()  # each processed column's scale group (no [out, in] scale copy)
    # the Hessian in processing order, reversed, in one gather (an n x n float64 copy is 0.6 GiB at n = 8960)
    backward = order.flip(0)
    hessian = gram.double()[backward[:, None], backward[None, :]]
    dead_rows = dead[backward]
    hessian[dead_rows, :] = 0.0
    hessian[:, dead_rows] = 0.0
    hessian.diagonal()[dead_rows] = diagonal[backward][dead_rows]
    hinv = _inverse_hessian_factor(hessian, damp)
    del hessian

    q = torch.zeros(out_features, in_features, dtype=torch.int8)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = weight[:, start:stop].clone()
        errors = torch.zeros_like(block)
        hblock = hinv[start:stop, start:stop]
        for i in range(stop - start):
            column = block[:, i]
            s = scale[:, col_group[start + i]]
            codes = torch.clamp(torch.round(column / s), -qmax, qmax)
            q[:, start + i] = codes.to(torch.int8)
            err = (column - codes * s) / hblock[i, i]
            block[:, i:] -= err[:, None] * hblock[i, i:][None, :]
            errors[:, i] = err
        weight[:, stop:] -= errors @ hinv[start:stop, stop:]

    restored = torch.empty_like(q)
    restored[:, order] = q
    if frozen is not None and frozen.numel():
        restored[:, frozen] = 0
    return restored, scale.float()

