"""aser-eval: perplexity windows, the reference backend against an independent computation, and vLLM's backend
against the reference on the same artifact."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from vllm_aser_offline.calibrate.calibration import CalibrationError
from vllm_aser_offline.evaluate.eval_cli import main as eval_main
from vllm_aser_offline.evaluate.perplexity import eval_windows, torch_perplexity

WINDOW = 64


def test_windows_are_consecutive_and_bounded(tiny_llama, calib_text):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    windows = eval_windows(calib_text, tokenizer, WINDOW)
    ids = tokenizer(calib_text.read_text(), add_special_tokens=False)["input_ids"]
    assert windows.shape == (len(ids) // WINDOW if tokenizer.eos_token_id is None
                             else (len(ids) + 1) // WINDOW, WINDOW)
    assert windows[1].tolist() == ids[WINDOW:2 * WINDOW]
    assert eval_windows(calib_text, tokenizer, WINDOW, max_windows=3).shape == (3, WINDOW)


def test_too_short_text_names_the_fix(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(CalibrationError, match="lower --window"):
        eval_windows(short, tokenizer, 2048)


def test_reference_perplexity_matches_independent_loss(llama_aser_fp32, calib_text):
    """The harness's figure equals exp(mean cross-entropy) from the reference model's own HF loss."""
    from vllm_aser_offline.evaluate.simulate import load_reference_model

    result = torch_perplexity(llama_aser_fp32, calib_text, WINDOW, max_windows=4, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(llama_aser_fp32)
    windows = eval_windows(calib_text, tokenizer, WINDOW, max_windows=4)
    model = load_reference_model(llama_aser_fp32)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    assert result.tokens == 4 * (WINDOW - 1)
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_quantized_perplexity_is_finite_and_above_source(tiny_llama, llama_aser_fp32, calib_text, tmp_path):
    out = tmp_path / "fp.json"
    assert eval_main([str(tiny_llama), "--text", str(calib_text), "--window", str(WINDOW), "--max-windows", "4",
                      "--quiet", "--output", str(out)]) == 0
    source = json.loads(out.read_text())
    quantized = torch_perplexity(llama_aser_fp32, calib_text, WINDOW, max_windows=4, progress=False)
    assert math.isfinite(quantized.ppl) and quantized.ppl > 1.0
    assert source["backend"] == "reference" and source["windows"] == 4
    # a random tiny model is near-uniform; W4A8 must not make it dramatically worse on text it was calibrated on
    assert quantized.ppl < source["ppl"] * 1.10


def test_lowrank_truncation_is_a_rank_sweep(llama_aser_fp32, calib_text):
    """Truncating the factors to the first r components is the rank-r reconstruction: full rank changes nothing,
    rank 0 drops the branch, and the modules really hold r components."""
    from vllm_aser_offline.evaluate.simulate import load_reference_model, truncate_lowrank

    model = load_reference_model(llama_aser_fp32)
    assert truncate_lowrank(model, 8) > 0
    downs = [m.down for m in model.modules() if getattr(m, "down", None) is not None]
    assert downs and all(d.shape[0] <= 8 for d in downs)
    full = torch_perplexity(llama_aser_fp32, calib_text, WINDOW, max_windows=2, progress=False)
    same = torch_perplexity(llama_aser_fp32, calib_text, WINDOW, max_windows=2, progress=False, lowrank_rank=10**6)
    none = torch_perplexity(llama_aser_fp32, calib_text, WINDOW, max_windows=2, progress=False, lowrank_rank=0)
    assert same.nll == full.nll and none.nll != full.nll and none.lowrank_rank == 0


def test_bad_arguments_exit_2(tiny_llama, calib_text, tmp_path, capsys):
    assert eval_main([str(tmp_path / "missing"), "--text", str(calib_text), "--quiet"]) == 2
    assert eval_main([str(tiny_llama), "--text", str(calib_text), "--max-windows", "0", "--quiet"]) == 2
    assert "--max-windows" in capsys.readouterr().err
    assert eval_main([str(tiny_llama), "--text", str(calib_text), "--lowrank-rank", "8", "--quiet"]) == 2
    assert "needs an ASER model directory" in capsys.readouterr().err


@pytest.mark.vllm
def test_vllm_backend_agrees_with_reference(llama_aser_fp32, calib_text, cpu_env, tmp_path):
    """Same artifact, same windows, float32: vLLM's prompt logprobs (cpu kernel) give the reference's perplexity.
    Per-channel int4 is exact in the int8 GEMM, so only float32 summation order differs: 0.1% is generous for a
    tiny model (SmolLM2's figure is in docs/ACCURACY.md)."""
    out = tmp_path / "vllm.json"
    proc = subprocess.run(
        [sys.executable, "-m", "vllm_aser_offline.evaluate.eval_cli", str(llama_aser_fp32), "--text", str(calib_text),
         "--window", str(WINDOW), "--max-windows", "4", "--backend", "vllm", "--enforce-eager", "--quiet",
         "--output", str(out)],
        capture_output=True, text=True, env=cpu_env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    served = json.loads(out.read_text())
    reference = torch_perplexity(llama_aser_fp32, calib_text, WINDOW, max_windows=4, progress=False)
    assert served["backend"] == "vllm" and served["tokens"] == reference.tokens
    assert served["ppl"] == pytest.approx(reference.ppl, rel=1e-3)
