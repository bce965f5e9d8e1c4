"""Perplexity on held-out text, in non-overlapping windows: the accuracy measure of the ablation table.

Both backends score exactly the same token windows (from `eval_windows`), so their figures are comparable: the
torch reference simulation here, and vLLM's prompt logprobs in `vllm_aser_offline.evaluate.perplexity_vllm`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_aser_offline.calibrate.calibration import CalibrationError, read_texts
from vllm_aser.format import is_aser_model


@dataclass
class PerplexityResult:
    model: str
    backend: str
    text: str
    window: int
    windows: int
    tokens: int  # predicted tokens: window - 1 per window (the first token of a window has no context)
    nll: float  # summed negative log-likelihood, nats
    seconds: float
    lowrank_rank: int | None = None  # every low-rank branch truncated to this rank (reference backend)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.tokens)

    def to_json(self) -> dict:
        return {**asdict(self), "ppl": round(self.ppl, 4)}


def eval_windows(text: str | Path, tokenizer, window: int, max_windows: int | None = None,
                 suffixes: tuple[str, ...] | None = None) -> torch.Tensor:
    """[n, window] token ids: the text's documents joined by EOS, cut into consecutive windows (tail dropped)."""
    if window < 2:
        raise ValueError(f"--window must be at least 2 tokens, got {window}")
    ids: list[int] = []
    for doc in read_texts(text, suffixes, tokenizer):
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
    count = len(ids) // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise CalibrationError(
            f"evaluation text {text} has {len(ids)} tokens, fewer than one window of {window}: lower --window"
        )
    return torch.tensor(ids[: count * window], dtype=torch.long).view(count, window)


def load_torch_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The reference simulation of an ASER directory, or the plain model of an unquantized one."""
    if is_aser_model(model_dir):
        from vllm_aser_offline.evaluate.simulate import load_reference_model

        return load_reference_model(model_dir, dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def window_nll(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    """Summed next-token NLL over all windows (float64 accumulation)."""
    total = 0.0
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc="perplexity", unit="batch", disable=not progress):
            logits = model(batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).double().item()
    return total


def torch_perplexity(
    model_dir: str | Path, text: str | Path, window: int, max_windows: int | None = None,
    dtype: torch.dtype = torch.float32, batch_size: int = 1, progress: bool = True,
    lowrank_rank: int | None = None, suffixes: tuple[str, ...] | None = None,
) -> PerplexityResult:
    from transformers import AutoTokenizer

    if lowrank_rank is not None and not is_aser_model(model_dir):
        raise ValueError(f"--lowrank-rank needs an ASER model directory; {model_dir} is not one")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = eval_windows(text, tokenizer, window, max_windows, suffixes)
    model = load_torch_model(model_dir, dtype)
    if lowrank_rank is not None:
        from vllm_aser_offline.evaluate.simulate import truncate_lowrank

        truncate_lowrank(model, lowrank_rank)
    start = time.perf_counter()
    nll = window_nll(model, windows, batch_size, progress)
    return PerplexityResult(
        model=str(model_dir), backend="reference", text=str(text), window=window, windows=windows.shape[0],
        tokens=windows.shape[0] * (window - 1), nll=nll, seconds=round(time.perf_counter() - start, 2),
        lowrank_rank=lowrank_rank,
    )
