"""Quantize one group of linears that share an input (q/k/v, gate/up, or a lone linear).

Siblings share one smoothing vector (vLLM fuses them and loads one per fused layer) and one outlier set. By
default they also share one low-rank down-projection, from one whitened SVD of their stacked errors: at equal
extra parameters it removed more output error than per-projection SVDs in every fused group measured
(docs/DESIGN-CHOICES.md). `joint_lowrank=False` keeps one pair per projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_aser_offline.quantize.gptq import quantize_gptq
from vllm_aser_offline.options import QuantizeOptions
from vllm_aser_offline.quantize.rank_allocation import energy_rank, pad_rank, provisional_budget_rank
from vllm_aser_offline.transform.smoothing import outlier_channels, smoothing_scales
from vllm_aser_offline.quantize.weight_quant import quantization_error, quantize_rtn
from vllm_aser_offline.quantize.whitening import (
    ActivationStats,
    LowRankSpectrum,
    damped_cholesky,
    output_error_energy,
    plain_svd,
    whitened_svd,
)


@dataclass
class QuantizedLinear:
    name: str
    q: torch.Tensor  # int8 [out, in]
    scale: torch.Tensor  # float32 [out, n_groups]
    smooth: torch.Tensor  # float32 [in]
    bias: torch.Tensor | None
    reference_energy: float  # ||W X||^2 on calibration data
    # relative output error ||(E - up_r down_r) X|| / ||W X|| for r = 0 .. max_rank (weight path only)
    error_curve: torch.Tensor
    spectrum: LowRankSpectrum | None = None
    rank: int = 0
    outliers: list[int] = field(default_factory=list)
    lowrank_unit: str = ""  # the layers of one unit share the down-projection (and the rank)
    shares: int = 1  # how many layers share this layer's down-projection

    @property
    def min_rank(self) -> int:
        """Extracted outlier columns are carried by the low-rank branch alone: keep room for them."""
        limit = self.spectrum.max_rank if self.spectrum is not None else 0
        return pad_rank(len(self.outliers), limit)

    @property
    def extra_params(self) -> float:
        """Low-rank parameters attributed to this layer (a shared down-projection is split among its sharers)."""
        return self.rank * (self.out_features + self.in_features / self.shares)

    @property
    def out_features(self) -> int:
        return self.q.shape[0]

    @property
    def in_features(self) -> int:
        return self.q.shape[1]

    def to(self, device: torch.device | str) -> QuantizedLinear:
        """Move every tensor (in place): results computed on a GPU are kept on the CPU until export."""
        for name in ("q", "scale", "smooth", "bias", "error_curve"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self.spectrum is not None:
            self.spectrum = LowRankSpectrum(*(t.to(device) for t in
                                              (self.spectrum.up, self.spectrum.down, self.spectrum.singular_values)))
        return self

    def release(self) -> None:
        """Drop the codes' and factors' storage once exported (shapes stay for the report): the export otherwise
        held every layer twice, as results and as output tensors."""
        self.q = self.q.to("meta")
        if self.spectrum is not None:
            self.spectrum = LowRankSpectrum(self.spectrum.up.to("meta"), self.spectrum.down.to("meta"),
                                            self.spectrum.singular_values)

    def lowrank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.rank or self.spectrum is None:
            return None
        return self.spectrum.factors(self.rank)

    def relative_error(self, rank: int | None = None) -> float:
        rank = self.rank if rank is None else rank
        return float(self.error_curve[min(rank, self.error_curve.shape[0] - 1)])


def error_curve(error: torch.Tensor, gram: torch.Tensor, spectrum: LowRankSpectrum | None, ref: float) -> torch.Tensor:
    """Exact relative output error after removing the first r components, for every r at once.

    ||(E - U_r D_r) X||^2 = e0 - 2 sum_{i<r} a_i + sum_{i,j<r} (U^T U)_ij (D G D^T)_ij with
    a_i = u_i^T E G d_i: the whole curve costs two small matrix products, so the per-layer report never
    needs E or G again (and the budget rule can change ranks after the fact).
    """
    e0 = output_error_energy(error, gram)
    if spectrum is None:
        return torch.tensor([e0 / max(ref, 1e-30)], dtype=torch.float64).sqrt()
    up, down = spectrum.up.double(), spectrum.down.double()
    dg = down @ gram
    a = (up * (error @ dg.t())).sum(0)
    h = (up.t() @ up) * (dg @ down.t())
    quad = h.cumsum(0).cumsum(1).diagonal()
    energy = torch.cat([torch.tensor([e0], dtype=torch.float64), e0 - 2 * a.cumsum(0) + quad])
    return (energy.clamp(min=0) / max(ref, 1e-30)).sqrt()


def _initial_rank(opts: QuantizeOptions, spectrum: LowRankSpectrum, out_f: int, in_f: int) -> int:
    limit = min(out_f, in_f, spectrum.max_rank)
    if opts.rank is not None:
        return pad_rank(opts.rank, limit)
    if opts.rank_energy is not None:
        return pad_rank(energy_rank(spectrum.singular_values, opts.rank_energy), limit)
    return pad_rank(provisional_budget_rank(opts.rank_budget or 0.0, out_f, in_f), limit)


def _base_quantize(
    smoothed: dict[str, torch.Tensor], outliers: torch.Tensor, gram: torch.Tensor, opts: QuantizeOptions
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """int4 codes and scales of each smoothed weight, extracted outlier columns set to zero (the low-rank branch
    carries them). GPTQ runs once on the siblings' stacked rows: they share the input, hence the Hessian."""
    cut = {}
    for name, w in smoothed.items():
        cut[name] = w.clone()
        cut[name][:, outliers] = 0.0
    importance = gram.diagonal().clamp(min=0) if opts.clip == "mse" else None
    stacked = torch.cat(list(cut.values())) if len(cut) > 1 else next(iter(cut.values()))
    if opts.base == "rtn":
        q, scale = quantize_rtn(stacked, opts.w_bits, opts.group_size, importance)
    else:
        q, scale = quantize_gptq(stacked, gram, opts.w_bits, opts.group_size, opts.damp, opts.act_order,
                                 frozen=outliers, clip=opts.clip == "mse")
    out, row = {}, 0
    for name, w in cut.items():
        out[name] = (q[row:row + w.shape[0]], scale[row:row + w.shape[0]])
        row += w.shape[0]
    return out


def quantize_group(
    linears: dict[str, torch.nn.Linear],
    stats: ActivationStats,
    opts: QuantizeOptions,
) -> list[QuantizedLinear]:
    """Smooth, extract, quantize and reconstruct every linear of one shared-input group."""
    weights = {name: lin.weight.detach().float() for name, lin in linears.items()}
    for name, w in weights.items():
        if not torch.isfinite(w).all():
            raise ValueError(f"weight of {name} contains NaN or inf: the source model is broken")
    in_features = next(iter(weights.values())).shape[1]
    weight_max = torch.stack([w.abs().amax(dim=0) for w in weights.values()]).amax(dim=0)

    smooth = torch.ones(in_features)
    outliers = torch.zeros(0, dtype=torch.long)
    if opts.method == "smoothquant":
        smooth = smoothing_scales(stats.act_max, weight_max, opts.alpha)
    elif opts.method == "aser" and opts.outliers:
        outliers = outlier_channels(stats.act_max, weight_max, opts.outliers)
        smooth = smoothing_scales(stats.act_max, weight_max, opts.alpha, outliers)
    gram = stats.smoothed_gram(smooth, in_place=True)  # the raw Gram matrix is not needed again
    whitening = damped_cholesky(gram, opts.damp) if opts.method in ("aser", "er") else None

    smoothed = {name: w * smooth[None, :] for name, w in weights.items()}
    codes = _base_quantize(smoothed, outliers, gram, opts)
    results = []
    errors = []
    for name, w_smooth in smoothed.items():
        q, scale = codes[name]
        errors.append(quantization_error(w_smooth, q, scale, opts.group_size))
        bias = linears[name].bias
        results.append(
            QuantizedLinear(
                name=name,
                q=q,
                scale=scale,
                smooth=smooth,
                bias=None if bias is None else bias.detach().clone(),
                reference_energy=output_error_energy(w_smooth, gram),
                error_curve=torch.empty(0),
                outliers=outliers.tolist(),
            )
        )

    # Low-rank units: the whole group (one SVD of the stacked error, shared down-projection) or each layer.
    units = [list(range(len(results)))] if opts.joint_lowrank else [[i] for i in range(len(results))]
    for unit in units:
        members = [results[i] for i in unit]
        stacked = torch.cat([errors[i] for i in unit]) if len(unit) > 1 else errors[unit[0]]
        max_rank = min(opts.max_rank, *stacked.shape)
        if opts.rank is not None:
            max_rank = min(max_rank, max(opts.rank, pad_rank(len(outliers), max_rank), 1))
        spectrum = None
        if opts.method in ("aser", "er"):
            spectrum = whitened_svd(stacked, whitening, max_rank)
        elif opts.method == "lorc":
            spectrum = plain_svd(stacked, max_rank)
        rank = 0
        if spectrum is not None:
            rank = max(_initial_rank(opts, spectrum, *stacked.shape), pad_rank(len(outliers), spectrum.max_rank))
        row = 0
        for i, member in zip(unit, members):
            member.lowrank_unit, member.shares, member.rank = members[0].name, len(unit), rank
            if spectrum is not None:
                rows = slice(row, row + member.out_features)
                member.spectrum = LowRankSpectrum(spectrum.up[rows], spectrum.down, spectrum.singular_values)
                row += member.out_features
            member.error_curve = error_curve(errors[i], gram, member.spectrum, member.reference_energy)
    return results
