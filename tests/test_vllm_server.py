"""`vllm serve DIR --quantization aser` (the stock console script, compiled, no --enforce-eager) and the
OpenAI-compatible API driven with the `openai` client. One server is shared by every test of this module."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(llama_aser_bf16, cpu_env, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "serve.log"
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_bin), "serve", str(llama_aser_bf16), "--quantization", "aser", "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "256", "--served-model-name", "tiny"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cpu_env)
    import urllib.request

    deadline = time.time() + 420
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError(f"server not healthy in 420 s:\n{log_path.read_text()[-4000:]}")
                time.sleep(1)
        from openai import OpenAI

        yield OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", timeout=120), log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_aser_method_and_kernel_were_used(server):
    _, log_path = server
    log = log_path.read_text()
    assert "quantization=aser" in log
    assert "ASER kernel: cpu" in log  # logged when ASERLinearMethod is built: not an unquantized fallback
    assert "enforce_eager=False" in log  # the compiled path


def test_completion(server):
    client, _ = server
    out = client.completions.create(model="tiny", prompt="The river city", max_tokens=8, temperature=0)
    assert out.usage.completion_tokens == 8
    again = client.completions.create(model="tiny", prompt="The river city", max_tokens=8, temperature=0)
    assert again.choices[0].text == out.choices[0].text  # greedy is deterministic


def test_chat_completion(server):
    client, _ = server
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Tell me about the old bridge"}], max_tokens=6,
        temperature=0,
    )
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens > 0


def test_streaming_matches_non_streaming(server):
    client, _ = server
    full = client.completions.create(model="tiny", prompt="Winter morning", max_tokens=10, temperature=0)
    stream = client.completions.create(
        model="tiny", prompt="Winter morning", max_tokens=10, temperature=0, stream=True
    )
    chunks = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == full.choices[0].text
