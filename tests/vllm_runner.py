"""Child process for tests: greedy generation with vLLM's offline LLM, results as JSON on the last line.

Each engine runs in its own process so that tests never share vLLM's global state.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    args = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args["model"],
        quantization=args.get("quantization", "aser"),
        dtype=args["dtype"],
        max_model_len=256,
        enforce_eager=args.get("enforce_eager", True),
        tensor_parallel_size=args.get("tp", 1),
        seed=0,
        distributed_executor_backend="mp" if args.get("tp", 1) > 1 else None,
    )
    params = SamplingParams(max_tokens=args["max_tokens"], temperature=0, logprobs=2)
    outputs = llm.generate(args["prompts"], params)
    results = []
    for out in outputs:
        completion = out.outputs[0]
        steps = list(zip(completion.logprobs, completion.token_ids))
        logprobs = [step[token].logprob for step, token in steps]
        # Gap between the chosen token and the best other one: how close a step was to a tie.
        margins = [step[token].logprob - max((v.logprob for k, v in step.items() if k != token), default=-1e9)
                   for step, token in steps]
        results.append({"prompt_ids": out.prompt_token_ids, "ids": list(completion.token_ids),
                        "logprobs": logprobs, "margins": margins})
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
