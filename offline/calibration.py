"""Calibration text: read .txt / .jsonl files (or a folder of them) and cut token windows."""

from __future__ import annotations

import json
from pathlib import Path

import torch


class CalibrationError(ValueError):
    """Calibration text that is missing, empty or too short."""


def read_texts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"calibration path {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise CalibrationError(f"{path} holds no .txt or .jsonl files")
    texts = []
    for file in files:
        if file.suffix == ".jsonl":
            for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CalibrationError(f"{file}:{lineno} is not valid JSON ({exc.msg})") from exc
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CalibrationError(f"{file}:{lineno} has no string field 'text'")
                texts.append(record["text"])
        elif file.suffix == ".txt" or not path.is_dir():
            texts.append(file.read_text(encoding="utf-8", errors="replace"))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"calibration text in {path} is empty")
    return texts


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
