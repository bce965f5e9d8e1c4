"""vLLM parameters for the low-rank factors, so that fused layers (QKV, gate/up) and TP shard them right.

A fused layer holds one down-projection [sum of sub-layer ranks, in] and one block-diagonal up-projection
[sum of sub-layer outputs, sum of ranks]; each sub-layer (q/k/v, gate/up) writes its own rank slot.
Column-parallel layers shard `up` on outputs and replicate `down`; row-parallel layers shard `down` on inputs
and replicate `up` (the layer's all-reduce then sums the partial branch outputs: no extra communication).
"""

from __future__ import annotations

import torch
from vllm.model_executor.parameter import ChannelQuantScaleParameter, RowvLLMParameter

from vllm_aser.format import FormatError


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"ASER {what}: checkpoint slice has shape {list(src.shape)}, expected {list(dst.shape)}")
    dst.copy_(src)


class _RankSlots:
    def _init_slots(self, ranks: list[int]) -> None:
        self.sub_ranks = list(ranks)
        self.rank_offsets = [sum(ranks[:i]) for i in range(len(ranks))]

    def _slot(self, shard_id: str | int) -> tuple[int, int]:
        i = self._shard_id_as_int(shard_id)  # type: ignore[attr-defined]
        return self.rank_offsets[i], self.sub_ranks[i]


class LowRankDownParameter(_RankSlots, RowvLLMParameter):
    """[sum(ranks), in_per_partition]; input_dim 1."""

    def __init__(self, ranks: list[int], **kwargs):
        self._init_slots(ranks)
        super().__init__(input_dim=1, **kwargs)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        _copy(self.data, loaded_weight, "lowrank_down")

    def _load_slot(self, loaded_weight: torch.Tensor, shard_id: str | int) -> None:
        offset, rank = self._slot(shard_id)
        _copy(self.data.narrow(0, offset, rank), loaded_weight, f"lowrank_down[{shard_id}]")

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_slot(loaded_weight, kwargs["shard_id"])

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_slot(loaded_weight, kwargs["shard_id"])


class LowRankUpParameter(_RankSlots, ChannelQuantScaleParameter):
    """[sum(out_per_partition), sum(ranks)], block diagonal over sub-layers; output_dim 0."""

    def __init__(self, ranks: list[int], **kwargs):
        self._init_slots(ranks)
        super().__init__(output_dim=0, **kwargs)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        _copy(self.data, loaded_weight, "lowrank_up")

    def _load_block(self, loaded_weight, shard_id, shard_offset: int, shard_size: int, source_rank: int) -> None:
        offset, rank = self._slot(shard_id)
        dst = self.data.narrow(0, shard_offset, shard_size).narrow(1, offset, rank)
        src = loaded_weight.narrow(0, source_rank * shard_size, shard_size)
        _copy(dst, src, f"lowrank_up[{shard_id}]")

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_block(loaded_weight, kwargs["shard_id"], kwargs["shard_offset"], kwargs["shard_size"], self.tp_rank)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        shard_id = kwargs["shard_id"]
        source_rank = self.tp_rank if shard_id == "q" else self.tp_rank // kwargs["num_heads"]
        self._load_block(loaded_weight, shard_id, kwargs["shard_offset"], kwargs["shard_size"], source_rank)


class SiblingSharedParameter(RowvLLMParameter):
    """A tensor every fused sub-layer (q/k/v, gate/up) carries its own copy of in the checkpoint: the smoothing
    vector, and the down-projection with `lowrank_shared`. vLLM loads one per fused layer, so the copies must be
    equal: the first loads, each later one is compared with it (instead of silently overwriting it)."""

    def __init__(self, what: str, layer_name: str, **kwargs):
        self._what, self._layer_name, self._first_shard = what, layer_name, None
        super().__init__(**kwargs)

    def _load_shared(self, loaded_weight: torch.Tensor, shard_id) -> None:
        if self._first_shard is None:
            _copy(self.data, loaded_weight, self._what)
            self._first_shard = shard_id
        elif self.data.shape != loaded_weight.shape or not torch.equal(self.data, loaded_weight.to(self.data.dtype)):
            raise FormatError(
                f"{self._layer_name}: its fused sub-layers carry different {self._what} tensors ({self._first_shard!r} "
                f"and {shard_id!r}), but vLLM runs them as one linear with one {self._what}: the artifact is "
                "inconsistent (edited, or written by another tool); re-quantize it with aser-quantize"
            )

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_shared(loaded_weight, kwargs["shard_id"])

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        self._load_shared(loaded_weight, kwargs["shard_id"])
