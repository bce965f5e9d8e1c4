"""README's llama.cpp comparison is generated from docs/throughput/vs_llamacpp.json: it must not drift from it."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vs_llamacpp() -> dict:
    return runpy.run_path(str(ROOT / "benchmarks" / "vs_llamacpp.py"), run_name="vs_llamacpp")


def test_readme_table_matches_the_results_file(vs_llamacpp):
    results = json.loads((ROOT / "docs" / "throughput" / "vs_llamacpp.json").read_text())
    readme = (ROOT / "README.md").read_text()
    assert vs_llamacpp["update_readme"](readme, results) == readme, (
        "README's generated table is out of date: run python benchmarks/vs_llamacpp.py (or regenerate it with "
        "update_readme from docs/throughput/vs_llamacpp.json)")


def test_readme_table_names_machine_and_ratio(vs_llamacpp):
    results = {"m": {"machine": "2-core test CPU", "date": "2026-01-01", "engines": {
        "llamacpp-q4_0": {"decode_tok_s": 100.0, "prompt_tok_s": 900.0, "batch16_tok_s": 120.0,
                          "batch64_tok_s": 50.0, "peak_rss_mib": 700.0},
        "aser": {"decode_tok_s": 90.0, "prompt_tok_s": 2000.0, "batch16_tok_s": 580.0, "batch64_tok_s": 800.0,
                 "peak_rss_mib": 4700.0}}}}
    table = vs_llamacpp["readme_table"](results)
    assert "2-core test CPU" in table and "| aser | 90.0 | 0.90 | 2000 | 580 | 800 | 4700 MiB |" in table


def test_update_readme_refuses_a_readme_without_markers(vs_llamacpp):
    with pytest.raises(ValueError, match="lacks the markers"):
        vs_llamacpp["update_readme"]("# no markers\n", {})
