"""Perplexity through vLLM itself: the prompt logprobs of the same windows the torch backend scores.

vLLM is imported only when this backend runs, so the quantizer keeps working without it.
"""

from __future__ import annotations

import time
from pathlib import Path

from vllm_aser_offline.evaluate.perplexity import PerplexityResult, eval_windows
from vllm_aser.format import is_aser_model


def vllm_perplexity(
    model_dir: str | Path, text: str | Path, window: int, max_windows: int | None = None,
    dtype: str = "float32", enforce_eager: bool = False, progress: bool = True,
    suffixes: tuple[str, ...] | None = None,
) -> PerplexityResult:
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise SystemExit(
            "the vllm backend needs vLLM: bash scripts/setup_cpu_env.sh (CPU) or pip install 'vllm-aser[cuda]'"
        ) from exc
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = eval_windows(text, tokenizer, window, max_windows, suffixes)
    llm = LLM(
        model=str(model_dir),
        quantization="aser" if is_aser_model(model_dir) else None,
        dtype=dtype,
        max_model_len=window + 1,  # the window plus the one token vLLM insists on generating
        enforce_eager=enforce_eager,
        seed=0,
    )
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False)
    prompts = [{"prompt_token_ids": row.tolist()} for row in windows]
    start = time.perf_counter()
    try:
        outputs = llm.generate(prompts, params, use_tqdm=progress)
    finally:
        # stop the engine now: left to interpreter exit, its teardown sometimes aborts the process (CPU build)
        llm.llm_engine.engine_core.shutdown()
    nll = 0.0
    for row, out in zip(windows.tolist(), outputs):
        # prompt_logprobs[0] is None (no context); entry i holds the logprob of token i given tokens < i
        for token, entry in zip(row[1:], out.prompt_logprobs[1:]):
            nll -= entry[token].logprob
    return PerplexityResult(
        model=str(model_dir), backend="vllm", text=str(text), window=window, windows=windows.shape[0],
        tokens=windows.shape[0] * (window - 1), nll=nll, seconds=round(time.perf_counter() - start, 2),
    )
