"""Write an ASER model directory atomically: a temporary sibling folder, renamed into place when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_aser_offline.quantize.layer_quant import QuantizedLinear
from vllm_aser import format as fmt
from vllm_aser.kernels.reference import pack_int

MAX_SHARD_BYTES = 4 * 1024**3
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_SKIP_FILES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", fmt.REPORT_FILENAME)


class OutputExistsError(FileExistsError):
    pass


@contextmanager
def atomic_output_dir(output_dir: str | Path, overwrite: bool):
    """Yield a temporary folder next to `output_dir`; move it in place only if the block succeeds."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise OutputExistsError(f"output directory {output_dir} exists: pass --overwrite to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp.rename(output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask(directory: Path) -> None:
    """mkdtemp makes a private folder; give the result the permissions a plain mkdir would have."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def quantized_tensors(result: QuantizedLinear, cfg: fmt.ASERQuantConfig, dtype: torch.dtype) -> dict:
    name = result.name
    lowrank_dtype = getattr(torch, cfg.lowrank_dtype)
    tensors = {
        fmt.tensor_name(name, fmt.WEIGHT_PACKED): pack_int(result.q, cfg.weight_bits),
        fmt.tensor_name(name, fmt.WEIGHT_SCALE): result.scale.float().contiguous(),
        fmt.tensor_name(name, fmt.WEIGHT_SHAPE): torch.tensor(result.q.shape, dtype=torch.int64),
        fmt.tensor_name(name, fmt.SMOOTH): result.smooth.float().clone(),
    }
    lowrank = result.lowrank()
    if lowrank is not None:
        up, down = lowrank
        tensors[fmt.tensor_name(name, fmt.LOWRANK_DOWN)] = down.to(lowrank_dtype).clone()  # may be shared
        tensors[fmt.tensor_name(name, fmt.LOWRANK_UP)] = up.to(lowrank_dtype).contiguous()
    if result.bias is not None:
        tensors[f"{name}.bias"] = result.bias.to(dtype).contiguous()
    return tensors


def write_shards(tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """safetensors shards of at most MAX_SHARD_BYTES, with an index when there is more than one."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    index["weight_map"] = weight_map
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_side_files(source: Path, directory: Path) -> None:
    """Tokenizer, generation config, chat template, license...: everything but weights and config."""
    for path in source.iterdir():
        if path.is_file() and path.suffix not in _WEIGHT_FILES and path.name not in _SKIP_FILES:
            shutil.copy2(path, directory / path.name)


def write_config(
    source: Path, directory: Path, quantization_config: dict, dtype: str, overrides: dict | None = None
) -> None:
    """The source config with the quantization section, the export dtype and `overrides` (e.g. untied
    embeddings after a rotation)."""
    config = json.loads((source / "config.json").read_text()) | (overrides or {})
    config.pop("quantization_config", None)
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
