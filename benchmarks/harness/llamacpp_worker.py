"""llama.cpp side of benchmarks/vs_llamacpp.py: runs in its own venv (ik-llama-cpp-python), one process per run.

Reads a JSON job on stdin, prints one result line ("RESULT " + JSON). Drives the low-level C API with a numpy argmax: the
package's high-level sampler fills a vocab-sized ctypes array in Python per token, which would measure Python.

Job: {"gguf": path, "threads": int, "prompts": [[token ids], ...], "max_tokens": int, "mode": "single"|"batch"}
- single: each prompt alone (prefill, then greedy decode), prompt and decode timed apart, medians returned.
- batch: all prompts at once, one sequence each, decoded in lockstep; output tokens / wall time.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import sys
import time

import numpy as np
from ik_llama_cpp import _ctypes_api as C
from ik_llama_cpp._internals import IkContext, IkModel


def _batch(entries: list[tuple[int, int, int, bool]]) -> C.llama_batch:
    """A llama_batch of (token, position, sequence, wants logits) rows."""
    batch = C.llama_batch_init(len(entries), 0, 1)
    batch.n_tokens = len(entries)
    for i, (token, pos, seq, logits) in enumerate(entries):
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = 1 if logits else 0
    return batch


def _decode(ctx: IkContext, entries: list[tuple[int, int, int, bool]]) -> None:
    batch = _batch(entries)
    try:
        rc = ctx.decode(batch)
    finally:
        C.llama_batch_free(batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")


def _argmax(ctx: IkContext, index: int, n_vocab: int) -> int:
    logits = ctx.get_logits(index)
    return int(np.ctypeslib.as_array(ctypes.cast(logits, ctypes.POINTER(ctypes.c_float)), (n_vocab,)).argmax())


def run_single(ctx: IkContext, n_vocab: int, prompt: list[int], max_tokens: int) -> tuple[float, float, list[int]]:
    ctx.kv_cache_clear()
    t0 = time.perf_counter()
    _decode(ctx, [(tok, i, 0, i == len(prompt) - 1) for i, tok in enumerate(prompt)])
    token = _argmax(ctx, len(prompt) - 1, n_vocab)
    t1 = time.perf_counter()
    out = [token]
    for step in range(max_tokens - 1):
        _decode(ctx, [(token, len(prompt) + step, 0, True)])
        token = _argmax(ctx, 0, n_vocab)
        out.append(token)
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (max_tokens - 1) / (t2 - t1), out


def run_batch(ctx: IkContext, n_vocab: int, prompts: list[list[int]], max_tokens: int) -> float:
    ctx.kv_cache_clear()
    t0 = time.perf_counter()
    rows = [(tok, i, seq, i == len(p) - 1) for seq, p in enumerate(prompts) for i, tok in enumerate(p)]
    _decode(ctx, rows)
    last = np.cumsum([len(p) for p in prompts]) - 1
    tokens = [_argmax(ctx, int(i), n_vocab) for i in last]
    for step in range(max_tokens - 1):
        _decode(ctx, [(tokens[s], len(p) + step, s, True) for s, p in enumerate(prompts)])
        tokens = [_argmax(ctx, s, n_vocab) for s in range(len(prompts))]
    return len(prompts) * max_tokens / (time.perf_counter() - t0)


def main() -> int:
    job = json.load(sys.stdin)
    prompts, max_tokens = job["prompts"], job["max_tokens"]
    t0 = time.perf_counter()
    model = IkModel(job["gguf"])
    n_seq = len(prompts) if job["mode"] == "batch" else 1
    per_seq = max(len(p) for p in prompts) + max_tokens + 8
    n_ctx = n_seq * per_seq if job["mode"] == "batch" else per_seq
    # flash attention trips an assert (iqk_fa_templates.h "S > 0") with several sequences in one batch
    ctx = IkContext(model, n_ctx=n_ctx, n_threads=job["threads"], n_seq_max=n_seq,
                    flash_attn=job.get("flash_attn", n_seq == 1))
    startup = time.perf_counter() - t0
    result: dict = {"startup_s": startup, "desc": model.desc}
    if job["mode"] == "single":
        run_single(ctx, model.n_vocab, prompts[0], 8)  # warm-up
        runs = [run_single(ctx, model.n_vocab, p, max_tokens) for p in prompts]
        result["prompt_tok_s"] = statistics.median(r[0] for r in runs)
        result["decode_tok_s"] = statistics.median(r[1] for r in runs)
        result["first_tokens"] = runs[0][2][:16]
    else:
        run_batch(ctx, model.n_vocab, [p[:16] for p in prompts], 4)  # warm-up
        result["output_tok_s"] = run_batch(ctx, model.n_vocab, prompts, max_tokens)
    print("RESULT " + json.dumps(result), flush=True)
    ctx.close()
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
