"""The startup summary of kernel paths: counts per path, fallback layers named with the reason, logged once."""

from __future__ import annotations

import logging

from vllm_aser.kernels.path_log import KernelPathLog


def test_summary_counts_paths_and_names_fallbacks(caplog, monkeypatch):
    log = KernelPathLog()
    for _ in range(6):
        log.expect()
    for i in range(4):
        log.record("cpu", "native", "AVX-512 VNNI", f"model.layers.{i}.mlp.down_proj")
    log.record("cpu", "onednn", "fallback: the native W4A8 kernel cannot run them: K = 10", "model.layers.0.self_attn.o_proj")
    log.record("cpu", "onednn", "fallback: the native W4A8 kernel cannot run them: K = 10", "model.layers.1.self_attn.o_proj")
    assert log.summary() == [
        "ASER cpu kernel: native path for 4 layers (AVX-512 VNNI)",
        "ASER cpu kernel: onednn path for 2 layers (model.layers.0.self_attn.o_proj, model.layers.1.self_attn.o_proj): "
        "the native W4A8 kernel cannot run them: K = 10",
    ]
    monkeypatch.setattr(logging.getLogger("vllm.aser"), "propagate", True)  # vLLM's logger may not propagate
    with caplog.at_level("INFO", logger="vllm.aser"):
        for _ in range(5):
            log.finished()
        assert "native path" not in caplog.text  # not before the last layer is prepared
        log.finished()
        assert "native path for 4 layers" in caplog.text and "onednn path for 2 layers" in caplog.text


def test_long_fallback_lists_are_cut():
    log = KernelPathLog()
    for i in range(5):
        log.record("cuda", "triton", "fallback: Marlin cannot run them: N = 72", f"l{i}")
    assert log.summary() == ["ASER cuda kernel: triton path for 5 layers (l0, l1, l2, ... (2 more)): "
                             "Marlin cannot run them: N = 72"]
