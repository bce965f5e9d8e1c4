"""README and docs speak of the project, not of how it is made: no tracker numbers a reader cannot open."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATTERN = re.compile(r"\bissues? #?\d+|lent GPU|\.\./shared/", re.IGNORECASE)


def test_readme_and_docs_name_no_tracker_issues():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:80]}"
            for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
            for i, line in enumerate(p.read_text().splitlines(), 1) if PATTERN.search(line)]
    assert not hits, "\n".join(hits)
