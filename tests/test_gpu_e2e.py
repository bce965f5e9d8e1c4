"""benchmarks/gpu_e2e.py, the one-shot GPU run, rehearsed on CPU: a lent GPU's minutes must not go to its bugs.

The full rehearsal (every stage, the CPU vLLM serving tiny models) takes minutes and is documented in
docs/CUDA.md; here the stage machinery, the quantize stage and the deadline are checked.
"""

from __future__ import annotations

import importlib.util
import json

import pytest


@pytest.fixture(scope="module")
def gpu_e2e():
    spec = importlib.util.spec_from_file_location("gpu_e2e", "benchmarks/gpu_e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_unknown_stage_and_missing_tokenizer_are_refused(gpu_e2e, tmp_path, tiny_llama, capsys):
    with pytest.raises(SystemExit):
        gpu_e2e.main(["--out", str(tmp_path), "--stages", "facts,warp", "--tokenizer", str(tiny_llama)])
    assert "unknown stage(s) warp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_e2e.main(["--out", str(tmp_path), "--tokenizer", str(tmp_path / "nowhere")])
    assert "no tokenizer there" in capsys.readouterr().err


def test_stages_past_the_deadline_are_skipped_with_a_note(gpu_e2e, tmp_path, tiny_llama):
    out = tmp_path / "out"
    assert gpu_e2e.main(["--out", str(out), "--work", str(tmp_path / "work"), "--tokenizer", str(tiny_llama),
                         "--stages", "kernels,throughput", "--deadline-s", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "s left, stage needs about" in results["kernels"]["skipped"]
    assert "s left" in results["throughput"]["skipped"]


def test_tiny_quantize_stage_writes_every_checkpoint(gpu_e2e, tmp_path, tiny_llama):
    """The quantize stage end to end on CPU: a Llama in the 8B model's layout (tiny), ASER with its report's
    totals, and the W8A8 / W4A16 (group 128) checkpoints the throughput stage serves."""
    out, work = tmp_path / "out", tmp_path / "work"
    assert gpu_e2e.main(["--tiny", "--out", str(out), "--work", str(work), "--tokenizer", str(tiny_llama),
                         "--stages", "facts,quantize", "--deadline-s", "600"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["device"] == "cpu" and results["facts"]["vllm"] != "unavailable"
    stage = results["quantize"]
    for method in ("aser", "w8a8", "w4a16"):
        assert stage[method]["rc"] == 0, stage[method]
        assert (work / f"llama3-8b-shape-2l-{method}" / "config.json").exists()
    assert stage["aser"]["device"] == "cpu" and stage["aser"]["totals"]["quantize_seconds"] > 0
    w4a16 = json.loads((work / "llama3-8b-shape-2l-w4a16" / "config.json").read_text())["quantization_config"]
    assert w4a16["config_groups"]["group_0"]["weights"]["group_size"] == 128
