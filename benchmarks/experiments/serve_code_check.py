"""Serve a quantized coder model with `vllm serve`, ask for code through the OpenAI chat API, and run the answer.

Starts the server, sends each task's prompt (temperature 0), takes the first ```python block of the reply, runs it
in a fresh interpreter with the task's asserts, and prints the reply and whether the code passed. Exit status 1 if
any task failed.

    python benchmarks/experiments/serve_code_check.py MODEL_DIR [--port 8011] [--max-tokens 400]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = {
    "is_prime": ("Write a Python function `is_prime(n)` that returns True when the integer n is prime. Reply with "
                 "the code only, in one ```python block.",
                 # against trial division up to 1000: a run whose answer skipped divisors 7, 13, ... passed a
                 # check of n < 30 only (it called 49 prime)
                 "brute = lambda n: n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))\n"
                 "assert [n for n in range(1000) if is_prime(n)] == [n for n in range(1000) if brute(n)]\n"
                 "assert not is_prime(-7) and is_prime(7919)"),
    "merge_intervals": ("Write a Python function `merge_intervals(intervals)` that takes a list of [start, end] "
                        "pairs and returns the merged overlapping intervals, sorted by start. Reply with the code "
                        "only, in one ```python block.",
                        "assert [list(x) for x in merge_intervals([[1, 3], [2, 6], [8, 10], [15, 18]])] == "
                        "[[1, 6], [8, 10], [15, 18]]\n"
                        "assert [list(x) for x in merge_intervals([[4, 5], [1, 4]])] == [[1, 5]]"),
}


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5):
                return
        except OSError:
            time.sleep(2)
    raise SystemExit("vllm serve was not ready in time")


def run_code(code: str, checks: str) -> tuple[bool, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(code + "\n\n" + checks + "\nprint('ok')\n")
    try:
        proc = subprocess.run([sys.executable, fh.name], capture_output=True, text=True, timeout=30)
    finally:
        os.unlink(fh.name)
    return proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.stdout + proc.stderr)[-500:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--max-tokens", type=int, default=400)
    args = p.parse_args(argv)
    from openai import OpenAI

    from vllm_aser.format import is_aser_model

    cmd = ["vllm", "serve", str(args.model_dir), "--port", str(args.port), "--dtype", "bfloat16",
           "--max-model-len", "2048"]
    if is_aser_model(args.model_dir):
        cmd += ["--quantization", "aser"]
    log = open(Path(tempfile.gettempdir()) / "serve_code_check.log", "w")
    start = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    failed = 0
    try:
        base = f"http://127.0.0.1:{args.port}"
        wait_ready(base, server)
        print(f"server ready in {time.perf_counter() - start:.0f} s ({' '.join(cmd)})", flush=True)
        client = OpenAI(base_url=base + "/v1", api_key="EMPTY")
        model = client.models.list().data[0].id
        for name, (prompt, checks) in TASKS.items():
            t0 = time.perf_counter()
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=args.max_tokens, temperature=0)
            text = reply.choices[0].message.content or ""
            seconds = time.perf_counter() - t0
            block = re.search(r"```(?:python)?\n(.*?)```", text, re.S)
            ok, output = run_code(block.group(1), checks) if block else (False, "no ```python block in the reply")
            failed += not ok
            print(f"--- {name}: {'PASSED' if ok else 'FAILED'} ({reply.usage.completion_tokens} tokens in "
                  f"{seconds:.1f} s)\n{text}\n" + ("" if ok else f"[run] {output}\n"), flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    print(f"{len(TASKS) - failed}/{len(TASKS)} tasks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
