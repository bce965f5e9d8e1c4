"""Broken ASER artifacts fail at load in vLLM, with an error that names the tensor or the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from artifact_edits import BROKEN, BROKEN_AT_LOAD, copy_artifact, edit_quant_config

pytestmark = pytest.mark.vllm


def load_error(model_dir: Path, env: dict, quantization: str = "aser") -> str:
    args = {"model": str(model_dir), "dtype": "float32", "prompts": ["x"], "max_tokens": 1,
            "quantization": quantization}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("vllm_runner.py")), json.dumps(args)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode != 0, "vLLM loaded a broken artifact"
    return proc.stderr + proc.stdout  # errors raised in a worker process are logged on its stdout


@pytest.mark.parametrize("case", sorted(BROKEN) + sorted(BROKEN_AT_LOAD))
def test_broken_artifact_is_refused_with_a_named_cause(case, llama_aser_fp32, tmp_path, cpu_env):
    break_it, message = {**BROKEN, **BROKEN_AT_LOAD}[case]
    model_dir = copy_artifact(llama_aser_fp32, tmp_path / case)
    break_it(model_dir)
    assert message in load_error(model_dir, cpu_env)


def test_config_of_another_method_is_refused(llama_aser_fp32, tmp_path, cpu_env):
    model_dir = copy_artifact(llama_aser_fp32, tmp_path / "gptq")
    edit_quant_config(model_dir, lambda q: q.update(quant_method="gptq"))
    stderr = load_error(model_dir, cpu_env)
    assert "gptq" in stderr and "does not match" in stderr
