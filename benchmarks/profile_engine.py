"""Where an engine's time goes, op by op: vLLM (in-process) under torch.profiler for one batch of requests.

Shows which ops dominate decode (or prefill) steps for any model directory, so kernel work goes where the time
is: e.g. the ASER custom op against the in-tree ops it calls (int8 GEMM, low-rank GEMMs, smoothing).

    python benchmarks/profile_engine.py MODEL_DIR [--prompts 64] [--input-len 8] [--output-len 64] [--rows 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=8, help="short prompts: the profile is mostly decode steps")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rows", type=int, default=16)
    args = p.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine runs in this process, under the profiler
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=args.input_len + args.output_len + 16, seed=0)
    prompts = [{"prompt_token_ids": list(range(100 + i, 100 + i + args.input_len))} for i in range(args.prompts)]
    llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    print(f"{args.model}: {args.prompts} requests x {args.input_len} in / {args.output_len} out in "
          f"{time.perf_counter() - start:.2f} s (under the profiler)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=50))
    sys.stdout.flush()
    os._exit(0)  # the CPU build's engine teardown can abort at interpreter exit


if __name__ == "__main__":
    sys.exit(main())
