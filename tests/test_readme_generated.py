"""README's headline tables are generated from the results files under docs/: they must not drift from them."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def readme_table() -> dict:
    return runpy.run_path(str(ROOT / "benchmarks" / "readme_table.py"), run_name="readme_table")


def test_readme_tables_match_the_results_files(readme_table):
    readme = (ROOT / "README.md").read_text()
    assert readme_table["update"](readme) == readme, (
        "README's generated tables are out of date: run python benchmarks/readme_table.py")


def test_readme_is_short():
    assert len((ROOT / "README.md").read_bytes()) <= 9000, "README.md grew past ~8 KB: move the detail to docs/"


def test_speed_row_names_machine_and_ratio(readme_table):
    results = {"m (Intel AMX)": {"model": "m", "machine": "2-core x86_64 CPU (Intel(R) Xeon(R) Processor, "
                                 "AMX-INT8/BF16), 24 GiB, no GPU", "date": "2026-01-01", "engines": {
        "llamacpp-q4_0": {"decode_tok_s": 100.0, "prompt_tok_s": 900.0, "batch16_tok_s": 120.0,
                          "batch64_tok_s": 50.0, "peak_rss_mib": 700.0},
        "aser": {"decode_tok_s": 90.0, "prompt_tok_s": 2000.0, "batch16_tok_s": 580.0, "batch64_tok_s": 800.0,
                 "peak_rss_mib": 4700.0}}}}
    row = readme_table["speed_table"](results)[-1]
    assert row.startswith("| m | 2-core Intel Xeon, AMX, 2026-01-01 | 100.0 (Q4_0) | **90.0** (0.90x) |"), row
    assert "| 120 / **580** |" in row


def test_accuracy_rows_per_text(readme_table):
    results = {"m/code": {"model": "m", "calib": "code (x)", "machine": "2-core x86_64 CPU (AMD EPYC, no AVX-512 "
                          "VNNI, no AMX), 24 GiB, no GPU", "date": "2026-01-02", "rows": {
        "source": {"scores": {"code": {"ppl": 2.0}, "prose": {"ppl": 10.0}}},
        "aser": {"scores": {"code": {"ppl": 2.1}, "prose": {"error": "failed"}}}}}}
    lines = readme_table["accuracy_table"](results)
    assert lines[2] == "| m (code) | 2-core AMD EPYC, AVX2, 2026-01-02 | code | 2.000 | **2.100** |"
    assert lines[3].endswith("| prose | 10.000 | – |")


def test_update_refuses_a_readme_without_markers(readme_table):
    with pytest.raises(ValueError, match="lacks the markers"):
        readme_table["update"]("# no markers\n")
