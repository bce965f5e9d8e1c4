"""Every knob of aser-quantize in one validated dataclass (the CLI and the report both use it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

METHODS = ("aser", "er", "smoothquant", "lorc", "rtn")
METHODS_WITH_LOWRANK = ("aser", "er", "lorc")
DTYPES = ("float16", "bfloat16", "float32")
BASES = ("rtn", "gptq")
CLIPS = ("minmax", "mse")
EXPORTS = ("aser", "compressed-tensors")
ROTATIONS = ("auto", "hadamard", "none")
DEVICES = ("auto", "cpu", "cuda")
COMPRESSED_TENSORS_BITS = ((8, 8), (4, 16))  # W8A8 int8, W4A16


class OptionsError(ValueError):
    """A bad combination of quantizer options."""


@dataclass
class QuantizeOptions:
    method: str = "aser"
    w_bits: int = 4
    a_bits: int = 8
    group_size: int = -1
    base: str = "gptq"
    act_order: bool = True
    clip: str = "mse"
    export: str = "aser"
    rank: int | None = None
    rank_energy: float | None = None
    rank_budget: float | None = 3.0
    max_rank: int = 256
    alpha: float = 0.5
    outliers: int = 4
    damp: float = 0.01
    rotate: str = "auto"
    quantize_head: bool = False  # lm_head as one more ASER linear (offline/quantize/head.py)
    mlp_hadamard: str = "none"  # down_proj's input rotated at run time: auto, none, or a block (offline/transform/mlp_rotation.py)
    moe_min_tokens: int | None = None
    device: str = "auto"
    propagate_quantized: bool = True
    joint_lowrank: bool = True
    dtype: str = "bfloat16"
    lowrank_dtype: str | None = None
    num_samples: int = 64
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise OptionsError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.base not in BASES:
            raise OptionsError(f"--base must be one of {BASES}, got {self.base!r}")
        if self.clip not in CLIPS:
            raise OptionsError(f"--clip must be one of {CLIPS}, got {self.clip!r}")
        if self.rotate not in ROTATIONS:
            raise OptionsError(f"--rotate must be one of {ROTATIONS}, got {self.rotate!r}")
        if self.mlp_hadamard not in ("auto", "none"):
            block = int(self.mlp_hadamard) if self.mlp_hadamard.isdigit() else 0
            if block < 2 or block & (block - 1):
                raise OptionsError(f"--mlp-hadamard must be auto, none or a power of two >= 2, got {self.mlp_hadamard!r}")
            if self.export != "aser":
                raise OptionsError("--mlp-hadamard rotates down_proj's input at run time, which only the ASER format "
                                   "describes: use --mlp-hadamard none with --export compressed-tensors")
        if self.quantize_head and self.export != "aser":
            raise OptionsError("--quantize-head writes the head in the ASER format: use it with --export aser")
        if self.w_bits not in (4, 8):
            raise OptionsError(f"--w-bits must be 4 or 8, got {self.w_bits}")
        if self.export not in EXPORTS:
            raise OptionsError(f"--export must be one of {EXPORTS}, got {self.export!r}")
        if self.export == "compressed-tensors":
            if self.method != "rtn":
                raise OptionsError("--export compressed-tensors holds plain int weights: use --method rtn "
                                   "(with --base rtn|gptq)")
            if (self.w_bits, self.a_bits) not in COMPRESSED_TENSORS_BITS:
                raise OptionsError("--export compressed-tensors writes W8A8 (--w-bits 8 --a-bits 8) or W4A16 "
                                   f"(--w-bits 4 --a-bits 16), got W{self.w_bits}A{self.a_bits}")
        elif not 2 <= self.a_bits <= 8:
            raise OptionsError(f"--a-bits must be in 2..8, got {self.a_bits} (16, unquantized activations, is only "
                               "for --export compressed-tensors)")
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % 8):
            raise OptionsError(f"--group-size must be -1 (per channel) or a multiple of 8, got {self.group_size}")
        rules = [r for r in (self.rank, self.rank_energy) if r is not None]
        if len(rules) > 1:
            raise OptionsError("give at most one of --rank, --rank-energy, --rank-budget")
        if rules:
            self.rank_budget = None
        if self.rank is not None and self.rank < 0:
            raise OptionsError(f"--rank must be >= 0, got {self.rank}")
        if self.rank_energy is not None and not 0 < self.rank_energy <= 1:
            raise OptionsError(f"--rank-energy must be in (0, 1], got {self.rank_energy}")
        if self.rank_budget is not None and not 0 <= self.rank_budget <= 100:
            raise OptionsError(f"--rank-budget is a percentage in [0, 100], got {self.rank_budget}")
        if self.method not in METHODS_WITH_LOWRANK:
            self.rank, self.rank_energy, self.rank_budget = 0, None, None
        if not 0 <= self.alpha <= 1:
            raise OptionsError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.outliers < 0:
            raise OptionsError(f"--outliers must be >= 0, got {self.outliers}")
        if self.damp < 0:
            raise OptionsError(f"--damp must be >= 0, got {self.damp}")
        if self.dtype not in DTYPES:
            raise OptionsError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.lowrank_dtype is None:
            self.lowrank_dtype = self.dtype
        if self.lowrank_dtype not in DTYPES:
            raise OptionsError(f"--lowrank-dtype must be one of {DTYPES}, got {self.lowrank_dtype!r}")
        if self.device not in DEVICES:
            raise OptionsError(f"--device must be one of {DEVICES}, got {self.device!r}")
        if self.moe_min_tokens is not None and self.moe_min_tokens < 0:
            raise OptionsError(f"--moe-min-tokens must be >= 0, got {self.moe_min_tokens}")
        for name in ("num_samples", "seq_len", "batch_size", "max_rank"):
            if getattr(self, name) <= 0:
                raise OptionsError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")

    @property
    def rank_rule(self) -> str:
        if self.rank is not None:
            return f"fixed:{self.rank}"
        if self.rank_energy is not None:
            return f"energy:{self.rank_energy}"
        if self.rank_budget is not None:
            return f"budget:{self.rank_budget}%"
        return "none"

    def to_dict(self) -> dict:
        return asdict(self)
