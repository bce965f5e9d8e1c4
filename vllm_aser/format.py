"""The ASER artifact contract: tensor names, shapes, dtypes and the quantization_config schema.

Both halves import this module (the offline quantizer writes what it describes, the vLLM plugin loads
it); it imports neither of them, nor vLLM. Anything that knows a tensor suffix or a config key lives here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

QUANT_METHOD = "aser"
FORMAT_VERSION = 1
# 2: some layers rotate their input at run time (`input_hadamard`); written only then, so that a plugin without
# the online rotation refuses the artifact instead of serving a model whose layers miss it
ROTATED_INPUT_FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS = (1, 2)
REPORT_FILENAME = "aser_report.json"

# Per quantized linear `P`, the checkpoint holds P.<suffix> for each of these (plus P.bias if the layer has one).
WEIGHT_PACKED = "weight_packed"  # int32 [out, ceil(in * bits / 32)], compressed-tensors pack_to_int32 layout
WEIGHT_SCALE = "weight_scale"  # float32 [out, n_groups] (n_groups = 1 for per-channel)
WEIGHT_SHAPE = "weight_shape"  # int64 [2] = (out, in)
SMOOTH = "smooth_scale"  # float32 [in]: the smoothed activation is x / smooth_scale
LOWRANK_DOWN = "lowrank_down"  # [rank, in]  (L_B: applied to the smoothed activation)
LOWRANK_UP = "lowrank_up"  # [out, rank] (L_A)
REQUIRED_SUFFIXES = (WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_SHAPE, SMOOTH)
LOWRANK_SUFFIXES = (LOWRANK_DOWN, LOWRANK_UP)
ALL_SUFFIXES = REQUIRED_SUFFIXES + LOWRANK_SUFFIXES

LOWRANK_DTYPES = ("float16", "bfloat16", "float32")
ACT_GRANULARITIES = ("per_token",)


class FormatError(ValueError):
    """An ASER artifact or quantization_config that does not match this format."""


@dataclass
class ASERQuantConfig:
    """The `quantization_config` entry of an ASER model's config.json."""

    weight_bits: int = 4
    weight_group_size: int = -1  # -1: one scale per output channel
    weight_symmetric: bool = True
    activation_bits: int = 8
    activation_granularity: str = "per_token"
    activation_symmetric: bool = True
    lowrank_dtype: str = "float16"
    # True: layers that vLLM fuses (q/k/v, gate/up) share one low-rank down-projection, stored identically under
    # each of them, and have equal ranks; False: one independent pair per layer
    lowrank_shared: bool = False
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    # rank of the low-rank branch per quantized module (Hugging Face module name); 0 = no branch
    ranks: dict[str, int] = field(default_factory=dict)
    # Hadamard block b per module whose input is rotated at run time (x blockdiag(H_b) / sqrt(b) before the ASER
    # product; vllm_aser/kernels/hadamard.py); absent modules are not rotated
    input_hadamard: dict[str, int] = field(default_factory=dict)
    method: str = "aser"
    calibration: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    quant_method: str = QUANT_METHOD

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.quant_method != QUANT_METHOD:
            raise FormatError(
                f"quantization_config.quant_method is {self.quant_method!r}, not {QUANT_METHOD!r}: "
                "this model was not written by aser-quantize; serve it with its own --quantization method"
            )
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise FormatError(
                f"quantization_config.format_version {self.format_version!r} is not supported by this "
                f"vllm-aser (supports {list(SUPPORTED_FORMAT_VERSIONS)}): upgrade vllm-aser or re-quantize"
            )
        if self.weight_bits not in (4, 8):
            raise FormatError(f"quantization_config.weight_bits must be 4 or 8, got {self.weight_bits!r}")
        if self.weight_group_size != -1 and (self.weight_group_size <= 0 or self.weight_group_size % 8):
            raise FormatError(
                "quantization_config.weight_group_size must be -1 (per channel) or a positive multiple of 8, "
                f"got {self.weight_group_size!r}"
            )
        if not self.weight_symmetric:
            raise FormatError("quantization_config.weight_symmetric=false is not supported (symmetric only)")
        if not 2 <= self.activation_bits <= 8:
            raise FormatError(f"quantization_config.activation_bits must be in 2..8, got {self.activation_bits!r}")
        if self.activation_granularity not in ACT_GRANULARITIES:
            raise FormatError(
                f"quantization_config.activation_granularity must be one of {ACT_GRANULARITIES}, "
                f"got {self.activation_granularity!r}"
            )
        if not self.activation_symmetric:
            raise FormatError("quantization_config.activation_symmetric=false is not supported (symmetric only)")
        if self.lowrank_dtype not in LOWRANK_DTYPES:
            raise FormatError(
                f"quantization_config.lowrank_dtype must be one of {LOWRANK_DTYPES}, got {self.lowrank_dtype!r}"
            )
        for name, rank in self.ranks.items():
            if not isinstance(rank, int) or rank < 0:
                raise FormatError(f"quantization_config.ranks[{name!r}] must be an int >= 0, got {rank!r}")
        if self.input_hadamard and self.format_version < ROTATED_INPUT_FORMAT_VERSION:
            raise FormatError(
                f"quantization_config.input_hadamard needs format_version {ROTATED_INPUT_FORMAT_VERSION}, the "
                f"artifact says {self.format_version}: it was edited by hand or written by a broken tool; re-quantize"
            )
        for name, block in self.input_hadamard.items():
            if name not in self.ranks:
                raise FormatError(f"quantization_config.input_hadamard names {name!r}, which is not a quantized module")
            if not isinstance(block, int) or block < 2 or block & (block - 1):
                raise FormatError(
                    f"quantization_config.input_hadamard[{name!r}] must be a power of two >= 2, got {block!r}"
                )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ASERQuantConfig:
        if not isinstance(raw, dict):
            raise FormatError(f"quantization_config must be a JSON object, got {type(raw).__name__}")
        if "quant_method" not in raw:
            raise FormatError("quantization_config has no 'quant_method' field")
        if "format_version" not in raw:
            raise FormatError("quantization_config has no 'format_version' field (written by an unknown tool?)")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise FormatError(f"quantization_config has unknown field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def version_for(cls, input_hadamard: dict[str, int]) -> int:
        """The format version a writer must declare: the oldest that can describe the artifact."""
        return ROTATED_INPUT_FORMAT_VERSION if input_hadamard else FORMAT_VERSION

    def renamed(self, map_weight_name: Callable[[str], str | None]) -> ASERQuantConfig:
        """The same config with its module names (Hugging Face's, as the checkpoint has them) mapped the way the
        engine maps the checkpoint's weight names (vLLM's `hf_to_vllm_mapper`), so per-module lookups find the
        engine's names. A module is mapped through its `.weight` name (prefix rules such as `lm_head.` need the
        dot); one the mapper would drop keeps its name."""

        def rename(module: str) -> str:
            mapped = map_weight_name(f"{module}.weight")
            return mapped.removesuffix(".weight") if mapped else module

        return replace(self, ranks={rename(k): v for k, v in self.ranks.items()},
                       input_hadamard={rename(k): v for k, v in self.input_hadamard.items()},
                       ignore=[rename(k) for k in self.ignore])

    def hadamard_of(self, module: str) -> int:
        """The module's input Hadamard block, 0 when its input is not rotated."""
        return self.input_hadamard.get(module, 0)

    def rank_of(self, module: str) -> int:
        if module not in self.ranks:
            raise FormatError(
                f"quantization_config.ranks has no entry for quantized module {module!r}: "
                "the artifact is incomplete; re-run aser-quantize"
            )
        return self.ranks[module]

    @property
    def pack_factor(self) -> int:
        return 32 // self.weight_bits

    def num_groups(self, in_features: int) -> int:
        return 1 if self.weight_group_size == -1 else math.ceil(in_features / self.weight_group_size)


def tensor_name(module: str, suffix: str) -> str:
    return f"{module}.{suffix}"


def expected_shapes(cfg: ASERQuantConfig, out_features: int, in_features: int, rank: int) -> dict[str, tuple]:
    """Shapes of every tensor of one quantized linear, keyed by suffix."""
    shapes = {
        WEIGHT_PACKED: (out_features, math.ceil(in_features / cfg.pack_factor)),
        WEIGHT_SCALE: (out_features, cfg.num_groups(in_features)),
        WEIGHT_SHAPE: (2,),
        SMOOTH: (in_features,),
    }
    if rank:
        shapes[LOWRANK_DOWN] = (rank, in_features)
        shapes[LOWRANK_UP] = (out_features, rank)
    return shapes


def _model_config(model_dir: str | Path) -> tuple[Path, dict]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FormatError(f"{path} does not exist: not a model directory")
    return path, json.loads(path.read_text())


def is_aser_model(model_dir: str | Path) -> bool:
    """Whether config.json declares this method (its settings are checked by read_quant_config)."""
    quant = _model_config(model_dir)[1].get("quantization_config") or {}
    return quant.get("quant_method") == QUANT_METHOD


def read_quant_config(model_dir: str | Path) -> ASERQuantConfig:
    path, raw = _model_config(model_dir)
    if "quantization_config" not in raw:
        raise FormatError(f"{path} has no quantization_config: not an ASER model (quantize it with aser-quantize)")
    return ASERQuantConfig.from_dict(raw["quantization_config"])


def read_tensor_headers(model_dir: str | Path) -> dict[str, tuple[str, tuple[int, ...], Path]]:
    """Name -> (safetensors dtype, shape, file) for every tensor of the directory, from the headers only."""
    headers: dict[str, tuple[str, tuple[int, ...], Path]] = {}
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FormatError(f"{model_dir} has no *.safetensors files")
    for file in files:
        with open(file, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                headers[name] = (info["dtype"], tuple(info["shape"]), file)
    return headers


_EXPECTED_DTYPES = {WEIGHT_PACKED: ("I32",), WEIGHT_SCALE: ("F32",), WEIGHT_SHAPE: ("I64",), SMOOTH: ("F32",)}
_LOWRANK_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def _declared_shape(model_dir, headers, module: str) -> tuple[int, int]:
    from safetensors import safe_open

    name = tensor_name(module, WEIGHT_SHAPE)
    if name not in headers:
        raise FormatError(f"{model_dir}: tensor {name!r} is missing")
    dtype, shape, file = headers[name]
    if dtype != "I64" or shape != (2,):
        raise FormatError(f"{model_dir}: tensor {name!r} must be int64 [2], found {dtype} {list(shape)}")
    with safe_open(file, framework="pt") as fh:
        out_features, in_features = (int(v) for v in fh.get_tensor(name).tolist())
    return out_features, in_features


def validate_checkpoint(model_dir: str | Path, cfg: ASERQuantConfig | None = None) -> None:
    """Check every quantized module's tensors (presence, shape, dtype) against its declared weight_shape.

    Cheap (headers plus one int64[2] per module), so the plugin runs it before vLLM allocates anything and a
    broken artifact fails with the tensor's name instead of a bare shape assertion deep in the loader.
    """
    cfg = cfg or read_quant_config(model_dir)
    headers = read_tensor_headers(model_dir)
    lowrank_st = _LOWRANK_ST_DTYPES[cfg.lowrank_dtype]
    for module, rank in cfg.ranks.items():
        out_features, in_features = _declared_shape(model_dir, headers, module)
        block = cfg.hadamard_of(module)
        if block and in_features % block:
            raise FormatError(f"{model_dir}: {module} has {in_features} input features, not a multiple of its "
                              f"input_hadamard block {block}")
        for suffix, shape in expected_shapes(cfg, out_features, in_features, rank).items():
            name = tensor_name(module, suffix)
            if name not in headers:
                raise FormatError(f"{model_dir}: tensor {name!r} is missing (rank {rank} in quantization_config)")
            dtype, got, _ = headers[name]
            if got != shape:
                raise FormatError(f"{model_dir}: tensor {name!r} has shape {list(got)}, expected {list(shape)}")
            allowed = _EXPECTED_DTYPES.get(suffix, (lowrank_st,))
            if dtype not in allowed:
                raise FormatError(f"{model_dir}: tensor {name!r} has dtype {dtype}, expected {allowed[0]}")
        if not rank:
            for suffix in LOWRANK_SUFFIXES:
                if tensor_name(module, suffix) in headers:
                    raise FormatError(
                        f"{model_dir}: tensor {tensor_name(module, suffix)!r} exists but "
                        f"quantization_config.ranks[{module!r}] is 0"
                    )
