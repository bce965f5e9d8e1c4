"""Calibration input: suffix selection, chat records through the chat template, and refusal of what is not text."""

from __future__ import annotations

import json
import os

import pytest
from conftest import quantize

from vllm_aser_offline.calibrate.calibration import CalibrationError, read_records, read_texts, render


def test_folder_reads_only_the_named_suffixes(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def f(x):\n    return x + 1\n")
    (tmp_path / "b.py").write_text("import os\n")
    (tmp_path / "notes.txt").write_text("prose")
    assert read_texts(tmp_path, [".py"]) == ["import os\n", "def f(x):\n    return x + 1\n"]
    assert read_texts(tmp_path, ["py", ".txt"]) == ["import os\n", "prose", "def f(x):\n    return x + 1\n"]
    assert read_texts(tmp_path) == ["prose"]  # default: .txt and .jsonl


def test_folder_without_usable_files_names_the_suffixes(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(CalibrationError, match=r"no files ending in \.txt, \.jsonl.*--calib-suffix"):
        read_records(tmp_path)


def test_binary_file_is_refused_with_its_name(tmp_path):
    blob = tmp_path / "random.txt"
    # bytes that happen to be valid UTF-8 but are control characters, as a binary file often decodes
    blob.write_bytes(bytes(b % 32 for b in os.urandom(200_000)).replace(b"\n", b"\x01"))
    with pytest.raises(CalibrationError, match=r"random\.txt is not text: only \d+% .*printable"):
        read_records(blob)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(CalibrationError, match=r"latin1\.txt is not UTF-8 text \(byte 3\)"):
        read_records(tmp_path)
    random_bytes = tmp_path / "urandom.txt"
    random_bytes.write_bytes(os.urandom(200_000))
    with pytest.raises(CalibrationError, match="urandom.txt"):
        read_records(random_bytes)


def test_chat_records_rendered_by_the_chat_template(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    chats = tmp_path / "chats.jsonl"
    chats.write_text(json.dumps({"messages": [{"role": "user", "content": "Write a sort."},
                                              {"role": "assistant", "content": "sorted(xs)"}]}) + "\n"
                     + json.dumps({"text": "plain prose"}) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    records = read_records(chats)
    assert records[1] == "plain prose" and isinstance(records[0], list)
    rendered = render(records, tokenizer)
    assert rendered[0] == tokenizer.apply_chat_template(records[0], tokenize=False)
    assert "Write a sort." in rendered[0] and "sorted(xs)" in rendered[0] and rendered[0] != "Write a sort."
    with pytest.raises(CalibrationError, match="need the model's tokenizer"):
        read_texts(chats)


def test_bad_chat_record_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    with pytest.raises(CalibrationError, match=r"bad\.jsonl:1: 'messages' must be"):
        read_records(bad)


def test_quantize_calibrates_on_a_folder_of_python_files(tiny_llama, calib_text, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    body = calib_text.read_text()
    for i in range(4):  # the prose fixture as "source files": enough tokens for 8 windows of 128
        (code / f"m{i}.py").write_text(body[i * len(body) // 4:(i + 1) * len(body) // 4])
    out = quantize(tiny_llama, tmp_path / "out", code, calib_suffixes=(".py",))
    report = json.loads((out / "aser_report.json").read_text())
    assert report["provenance"]["calibration"]["suffixes"] == [".py"]
    with pytest.raises(CalibrationError, match="--calib-suffix"):
        quantize(tiny_llama, tmp_path / "out2", code)
    assert not (tmp_path / "out2").exists()
