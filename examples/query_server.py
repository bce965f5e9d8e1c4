"""Send one completion and one chat request to a running `vllm serve` (OpenAI-compatible API), print answers.

    python examples/query_server.py --base-url http://127.0.0.1:8000/v1
"""

from __future__ import annotations

import argparse

from openai import OpenAI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--question", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    client = OpenAI(base_url=args.base_url, api_key="EMPTY")
    model = client.models.list().data[0].id
    completion = client.completions.create(
        model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0
    )
    print(f"[completion] {args.prompt!r} -> {completion.choices[0].text!r}")
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.question}],
        max_tokens=args.max_tokens,
        temperature=0,
    )
    print(f"[chat] {args.question!r} -> {chat.choices[0].message.content!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
