"""Shared fixtures: tiny Llama/Qwen2 models built locally and their ASER artifacts (built once per session)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_model, write_calibration_text  # noqa: E402

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    if HAS_VLLM:
        return
    skip = pytest.mark.skip(reason="vLLM (CPU build) not installed: run scripts/setup_cpu_env.sh")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("aser")


@pytest.fixture(scope="session")
def calib_text(workdir) -> Path:
    return write_calibration_text(workdir / "calib.txt")


@pytest.fixture(scope="session")
def tiny_llama(workdir) -> Path:
    return build_tiny_model(workdir / "llama", "llama", seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2(workdir) -> Path:
    return build_tiny_model(workdir / "qwen2", "qwen2", seed=1)


def quantize(model: Path, out: Path, calib: Path, calib_suffixes: tuple[str, ...] | None = None, **options) -> Path:
    from vllm_aser_offline.options import QuantizeOptions
    from vllm_aser_offline.pipeline import quantize_model

    # unrotated unless asked: the engine tolerances were measured on these artifacts, and the rotated path has
    # its own fixtures (qwen2_aser_rotated, tests/test_rotation.py)
    options.setdefault("rotate", "none")
    opts = QuantizeOptions(num_samples=8, seq_len=128, batch_size=4, **options)
    quantize_model(model, out, calib, opts, overwrite=True, progress=False, calib_suffixes=calib_suffixes)
    return out


@pytest.fixture(scope="session")
def llama_aser_fp32(workdir, tiny_llama, calib_text) -> Path:
    """Default options (shared low-rank down-projection per fused group) with a larger budget."""
    return quantize(tiny_llama, workdir / "llama-aser-fp32", calib_text, rank_budget=15.0, dtype="float32")


@pytest.fixture(scope="session")
def llama_aser_fp32_separate(workdir, tiny_llama, calib_text) -> Path:
    """One low-rank pair per projection (different ranks within a fused layer): the rank-slot loading path."""
    return quantize(tiny_llama, workdir / "llama-aser-fp32-sep", calib_text, rank_budget=15.0, dtype="float32",
                    joint_lowrank=False)


@pytest.fixture(scope="session")
def llama_aser_bf16(workdir, tiny_llama, calib_text) -> Path:
    return quantize(tiny_llama, workdir / "llama-aser-bf16", calib_text, rank_budget=15.0, dtype="bfloat16")


@pytest.fixture(scope="session")
def tiny_qwen2_tied(workdir) -> Path:
    return build_tiny_model(workdir / "qwen2-tied", "qwen2", seed=2, tie_embeddings=True)


@pytest.fixture(scope="session")
def qwen2_aser_rotated(workdir, tiny_qwen2_tied, calib_text) -> Path:
    """Rotated residual stream (tied embeddings, so the head is untied)."""
    return quantize(tiny_qwen2_tied, workdir / "qwen2-aser-rotated", calib_text, rank=8, group_size=64,
                    dtype="float32", rotate="hadamard")


@pytest.fixture(scope="session")
def llama_aser_mlp_rotated(workdir, tiny_llama, calib_text) -> Path:
    """Residual rotation and down_proj's input rotated at run time (Hadamard blocks of 16: the MLP is 304 wide)."""
    return quantize(tiny_llama, workdir / "llama-aser-mlp-rotated", calib_text, rank=8, dtype="float32",
                    rotate="hadamard", mlp_hadamard="auto")


@pytest.fixture(scope="session")
def qwen2_aser_head(workdir, tiny_qwen2_tied, calib_text) -> Path:
    """The head quantized too (`--quantize-head`), on a model with tied embeddings and no rotation: the artifact
    must untie them itself."""
    return quantize(tiny_qwen2_tied, workdir / "qwen2-aser-head", calib_text, rank_budget=15.0, dtype="float32",
                    quantize_head=True)


@pytest.fixture(scope="session")
def qwen2_aser_fp32(workdir, tiny_qwen2, calib_text) -> Path:
    """Fixed rank and group-wise scales; Qwen2 has q/k/v biases."""
    return quantize(tiny_qwen2, workdir / "qwen2-aser-fp32", calib_text, rank=8, group_size=64, dtype="float32")


@pytest.fixture(scope="session")
def cpu_env() -> dict[str, str]:
    """Environment for child processes running vLLM's CPU build."""
    venv = Path(sys.executable).parent.parent
    env = dict(os.environ)
    iomp = venv / "lib" / "libiomp5.so"
    if iomp.exists() and str(iomp) not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = f"{iomp}:{env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else str(iomp)
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        VLLM_CPU_OMP_THREADS_BIND=env.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        TOKENIZERS_PARALLELISM="false",
    )
    return env
