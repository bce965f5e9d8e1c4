"""The accuracy table runner's bookkeeping: rows are cached by their resolved options, gaps are computed from the
right baseline, and a changed default invalidates the rows it affects."""

from __future__ import annotations

import runpy

import pytest


@pytest.fixture(scope="module")
def table():
    return runpy.run_path("benchmarks/accuracy_table.py", run_name="accuracy_table")


def fake_record(table, row, ppl: float) -> dict:
    return {"command": table["row_command"](row), "options": table["resolved_options"](row), "eval": table["EVAL_SETS"],
            "extra_params_percent": 3.0, "mean_rank": 12.0, "quantize_seconds": 100.0, "peak_rss_mib": 1000.0,
            "scores": {"wikipedia": {"ppl": ppl}, "bbc": {"ppl": ppl + 1}}}


def test_rows_are_unique_and_resolve(table):
    rows = table["table_rows"]()
    assert len({r.id for r in rows}) == len(rows)
    for row in rows:
        opts = table["resolved_options"](row)
        assert (opts is None) == (not row.quantized)
        assert not row.baseline or any(r.id == row.baseline for r in rows)


def test_cache_follows_resolved_options(table):
    rows = {r.id: r for r in table["table_rows"]()}
    aser = rows["w4a8-aser-b3"]
    results = {"w4a8-aser-b3": fake_record(table, aser, 30.0)}
    assert table["is_cached"](aser, results)
    results["w4a8-aser-b3"]["options"]["alpha"] = 0.3  # as if the default had been different when it ran
    assert not table["is_cached"](aser, results)


def test_gap_closed_uses_the_row_baseline(table):
    rows = table["table_rows"]()
    by_id = {r.id: r for r in rows}
    results = {rid: fake_record(table, by_id[rid], ppl) for rid, ppl in
               [("fp", 20.0), ("w4a8-rtn", 40.0), ("w4a8-aser-b3", 26.0), ("g128-rtn", 30.0), ("g128-aser-b3", 25.0)]}
    text = table["render"](rows, results)
    line = next(l for l in text.splitlines() if "`aser` budget 3%" in l and "26.00" in l)
    assert "| 70% |" in line  # (40 - 26) / (40 - 20)
    line = next(l for l in text.splitlines() if "`aser` budget 3%" in l and "25.00" in l)
    assert "| 50% |" in line  # against group-128 RTN: (30 - 25) / (30 - 20)
    assert "not run" in text


def test_rows_cached_before_an_option_existed_match_only_its_old_behaviour(table):
    rows = {r.id: r for r in table["table_rows"]()}
    old, rotated = rows["w4a8-aser-b3"], rows["rot-aser-b3"]
    results = {rid: fake_record(table, rows[rid], 30.0) for rid in ("w4a8-aser-b3", "rot-aser-b3")}
    for rec in results.values():
        for option in table["ADDED_OPTIONS"]:
            del rec["options"][option]  # recorded before --rotate existed
    assert table["is_cached"](old, results)  # pins --rotate none: the old behaviour
    assert not table["is_cached"](rotated, results)


def test_rows_cached_with_a_removed_option_match_only_at_its_kept_behaviour(table):
    rows = {r.id: r for r in table["table_rows"]()}
    row = rows["rot-aser-b3"]
    kept, other = fake_record(table, row, 30.0), fake_record(table, row, 30.0)
    kept["options"]["fit_target"] = "layer"  # what the quantizer still does
    other["options"]["fit_target"] = "model"  # what it no longer can
    assert table["is_cached"](row, {row.id: kept})
    assert not table["is_cached"](row, {row.id: other})
