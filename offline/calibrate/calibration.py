"""Calibration text: read text files, JSONL text or chat records (a file or a folder), and cut token windows."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class CalibrationError(ValueError):
    """Calibration text that is missing, empty, too short, or not text."""


DEFAULT_SUFFIXES = (".txt", ".jsonl")
MIN_PRINTABLE = 0.95  # share of printable characters below which a file is taken for binary or mis-encoded

# A calibration record: plain text, or a chat (the `messages` of a JSONL record) the tokenizer's template renders.
Record = str | list[dict]


def _decoded(file: Path) -> str:
    """The file's text, refused when it is not UTF-8 or not mostly printable (binary data, another encoding)."""
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{file} is not UTF-8 text (byte {exc.start}): convert it (e.g. iconv -t utf-8) "
                               "or leave it out of --calib") from exc
    if text:
        printable = sum(c.isprintable() or c in "\n\r\t" for c in text)
        if printable < MIN_PRINTABLE * len(text):
            raise CalibrationError(f"{file} is not text: only {printable / len(text):.0%} of its characters are "
                                   "printable (a binary file?): leave it out of --calib")
    return text


def _messages(record: dict, where: str) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise CalibrationError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    return messages


def _jsonl_records(file: Path) -> list[Record]:
    records: list[Record] = []
    for lineno, line in enumerate(_decoded(file).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{where} is not valid JSON ({exc.msg})") from exc
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            records.append(record["text"])
        elif isinstance(record, dict) and "messages" in record:
            records.append(_messages(record, where))
        else:
            raise CalibrationError(f"{where} has neither a string field 'text' nor a chat 'messages' list")
    return records


def normalize_suffixes(suffixes: tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """`py`, `.py` -> `.py`; None -> the default .txt / .jsonl."""
    if not suffixes:
        return DEFAULT_SUFFIXES
    return tuple(s if s.startswith(".") else f".{s}" for s in suffixes)


def read_records(path: str | Path, suffixes: tuple[str, ...] | list[str] | None = None) -> list[Record]:
    """The texts (and chats) of a file, or of every file under a folder whose name ends in one of `suffixes`.
    .jsonl files hold one record per line: {"text": ...} or {"messages": [{"role", "content"}, ...]}."""
    path = Path(path)
    suffixes = normalize_suffixes(suffixes)
    if not path.exists():
        raise CalibrationError(f"calibration path {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in suffixes)
        if not files:
            raise CalibrationError(f"{path} holds no files ending in {', '.join(suffixes)}: name the suffix of "
                                   "your files with --calib-suffix (e.g. --calib-suffix .py)")
    else:
        files = [path]
    records: list[Record] = []
    for file in files:
        if file.suffix == ".jsonl":
            records.extend(_jsonl_records(file))
        else:
            records.append(_decoded(file))
    records = [r for r in records if not isinstance(r, str) or r.strip()]
    if not records:
        raise CalibrationError(f"calibration text in {path} is empty")
    return records


def render(records: list[Record], tokenizer) -> list[str]:
    """Chats rendered by the tokenizer's chat template (as the model sees them when served); text unchanged."""
    if any(not isinstance(r, str) for r in records) and not getattr(tokenizer, "chat_template", None):
        raise CalibrationError("the calibration data holds chat 'messages' but the model's tokenizer has no chat "
                               "template: give plain 'text' records")
    return [r if isinstance(r, str) else tokenizer.apply_chat_template(r, tokenize=False) for r in records]


def read_texts(path: str | Path, suffixes: tuple[str, ...] | list[str] | None = None, tokenizer=None) -> list[str]:
    """Plain texts of `path` (chat records rendered with `tokenizer`, which they need)."""
    records = read_records(path, suffixes)
    if tokenizer is None:
        if any(not isinstance(r, str) for r in records):
            raise CalibrationError(f"{path} holds chat 'messages': they need the model's tokenizer to be rendered")
        return records
    return render(records, tokenizer)


def token_windows(texts: list[str], tokenizer, num_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """[num_samples, seq_len] token ids: non-overlapping windows of the concatenated text, seeded choice."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    available = len(ids) // seq_len
    if available < num_samples:
        raise CalibrationError(
            f"calibration text has {len(ids)} tokens, enough for {available} windows of {seq_len}; "
            f"{num_samples} requested: give more text or lower --num-samples / --seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:num_samples].sort().values
    flat = torch.tensor(ids[: available * seq_len], dtype=torch.long).view(available, seq_len)
    return flat[chosen]
