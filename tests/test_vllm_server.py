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


def _completion_ids_and_logprobs(client, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy tokens (as ids) and their logprobs from the server's completion API, prompt given as token ids."""
    out = client.completions.create(model="tiny", prompt=prompt_ids, max_tokens=max_tokens, temperature=0,
                                    logprobs=1, extra_body={"return_tokens_as_token_ids": True})
    lp = out.choices[0].logprobs
    return [int(t.removeprefix("token_id:")) for t in lp.tokens], list(lp.token_logprobs)


# The compiled bf16 path against the float32 reference of the same files, by teacher forcing the server's own tokens
# (tokens may flip at near-ties in bf16; like for like is each chosen token's logprob). bf16 rounds every op to 8
# mantissa bits, so a single step may drift by a few 1e-2 nats; the mean over all steps is the sharper statistic.
# Negative control: the same checks against the reference with the low-rank branch zeroed (what a kernel that
# dropped the branch would serve) must fail, so a compiled path that lost ASER's correction cannot pass.
BF16_MAX_DRIFT, BF16_MEAN_DRIFT = 0.1, 0.02


def test_compiled_bf16_logprobs_match_reference(server, llama_aser_bf16, tmp_path):
    from artifact_edits import copy_artifact, edit_tensors
    from test_vllm_engine import PROMPTS, reference_logprobs
    from transformers import AutoTokenizer

    client, _ = server
    tokenizer = AutoTokenizer.from_pretrained(llama_aser_bf16)
    broken = copy_artifact(llama_aser_bf16, tmp_path / "no-lowrank")
    def zero_lowrank(tensors):
        for name, t in tensors.items():
            if name.endswith(".lowrank_up"):
                t.zero_()

    edit_tensors(broken, zero_lowrank)
    drift, control = [], []
    for prompt in PROMPTS:
        prompt_ids = tokenizer(prompt).input_ids
        ids, logprobs = _completion_ids_and_logprobs(client, prompt_ids, 12)
        assert len(ids) == 12
        _, ref = reference_logprobs(llama_aser_bf16, prompt_ids, ids)
        _, ref_broken = reference_logprobs(broken, prompt_ids, ids)
        drift += [abs(a - b) for a, b in zip(logprobs, ref)]
        control += [abs(a - b) for a, b in zip(logprobs, ref_broken)]
    assert max(drift) < BF16_MAX_DRIFT and sum(drift) / len(drift) < BF16_MEAN_DRIFT, (max(drift), drift)
    # the checks must have been able to fail: the zeroed branch is far outside the mean tolerance
    assert sum(control) / len(control) > 3 * BF16_MEAN_DRIFT, f"negative control passed: {control}"


def test_batched_requests_equal_one_at_a_time(server):
    """Four prompts in one request (scheduled in one batch) against each alone: the same greedy tokens up to the
    first step where the one-at-a-time run had a near-tie (top two within 0.1 nats in bf16), after which the
    continuations are not comparable."""
    client, _ = server
    prompts = ["The river city music", "Summer night in the old village", "King of the north", "Winter morning"]
    batched = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, temperature=0)
    texts = {c.index: c.text for c in batched.choices}
    compared = 0
    for i, prompt in enumerate(prompts):
        alone = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=2)
        if alone.choices[0].text == texts[i]:
            compared += 1
            continue
        tops = alone.choices[0].logprobs.top_logprobs
        margins = [sorted(step.values(), reverse=True) for step in tops]
        assert any(len(m) > 1 and m[0] - m[1] < 0.1 for m in margins), (
            f"prompt {i}: batched {texts[i]!r} != alone {alone.choices[0].text!r} with no near-tie")
    assert compared >= 3


def test_prompt_longer_than_max_model_len_is_a_400(server):
    from openai import BadRequestError

    client, _ = server
    with pytest.raises(BadRequestError) as err:
        client.completions.create(model="tiny", prompt=[5] * 300, max_tokens=4)  # --max-model-len 256
    assert "256" in str(err.value)


def test_bad_sampling_parameters_are_a_400(server):
    from openai import BadRequestError

    client, _ = server
    with pytest.raises(BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=-1.0)
    with pytest.raises(BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, top_p=0.0)


def test_unknown_model_name_is_a_404(server):
    from openai import NotFoundError

    client, _ = server
    with pytest.raises(NotFoundError, match="not-served"):
        client.completions.create(model="not-served", prompt="x", max_tokens=4)
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens == 2


def test_serve_exits_on_a_broken_artifact_naming_the_tensor(llama_aser_bf16, cpu_env, tmp_path):
    """`vllm serve` on an artifact with a mis-shaped tensor must exit non-zero (not hang) and name the tensor."""
    from artifact_edits import BROKEN, copy_artifact

    break_it, message = BROKEN["wrong_shape"]
    broken = copy_artifact(llama_aser_bf16, tmp_path / "broken")
    break_it(broken)
    cmd = [str(Path(sys.executable).with_name("vllm")), "serve", str(broken), "--quantization", "aser",
           "--host", "127.0.0.1", "--port", str(free_port()), "--max-model-len", "256"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cpu_env, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
