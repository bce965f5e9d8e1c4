"""Wiki markup becomes plain prose for the perplexity text."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # scripts, not a package

from eval_text import plain_wiki_text  # noqa: E402


def test_markup_is_stripped_to_prose():
    markup = (
        "{{Infobox person|name=Ada}}\n"
        "'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref>Some source</ref>\n\n\n\n"
        "[[File:Ada.jpg|thumb|A portrait]]\n"
        "== Life ==\n"
        "She wrote ''notes'' on the [[Analytical Engine]].\n"
        "[[Category:Mathematicians]]\n"
    )
    text = plain_wiki_text(markup)
    assert "Ada Lovelace was an English mathematician." in text
    assert "She wrote notes on the Analytical Engine." in text
    for leftover in ("[[", "]]", "{{", "'''", "<ref", "Some source", "Category:", "thumb|", "\n\n\n"):
        assert leftover not in text, leftover
