"""The server through the official openai client and raw HTTP, on a real loopback port."""

import json
import threading
import time

import httpx
import pytest

from moe_offload import SamplingParams
from server_helpers import API_KEY, MODEL, ServerThread, SlowModel

@pytest.fixture(scope="module")
def server(tiny_engine):
    from moe_offload.server.app import create_app

    with ServerThread(create_app(tiny_engine, MODEL, api_key=API_KEY, max_queue=64)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about experts"}]


def expected_chat(engine, messages, n):
    return engine.chat(messages, SamplingParams(max_new_tokens=n, ignore_eos=False))


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(server.url + "/metrics").json()
    assert {"requests", "queue_depth", "last_decode_tok_s", "cache_hit_rate"} <= set(metrics)


def test_chat_completion_matches_engine(server, client, tiny_engine):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    expected = expected_chat(tiny_engine, MESSAGES, 12)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens


def test_chat_stream_equals_non_stream(server, client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_completions_stream_and_not(server, client, tiny_engine):
    expected = tiny_engine.generate("Offloading keeps", max_new_tokens=10, ignore_eos=False)
    reply = client.completions.create(model=MODEL, prompt="Offloading keeps", max_tokens=10, temperature=0)
    assert reply.choices[0].text == expected.text and reply.usage.completion_tokens == expected.completion_tokens
    stream = client.completions.create(model=MODEL, prompt="Offloading keeps", max_tokens=10, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected.text


def test_stop_string(server, client, tiny_engine):
    full = tiny_engine.generate("Hello", max_new_tokens=20, ignore_eos=True).text
    stop = full[4:6]
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=0, stop=[stop])
    assert reply.choices[0].finish_reason == "stop" and reply.choices[0].text == full[: full.find(stop)]


def post(server, path, body, key=API_KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + path, content=raw, headers=headers, timeout=60)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("case,status,fragment", [
    ("malformed", 400, ""), ("wrong-type", 400, "temperature"), ("unknown-model", 404, "does not exist"),
    ("too-long", 400, "context window"), ("max-tokens-0", 400, "max_tokens"), ("max-tokens-huge", 400, "max_tokens"),
    ("no-key", 401, "API key"), ("wrong-key", 401, "API key"), ("empty-messages", 400, "messages"),
])
def test_bad_requests(server, case, status, fragment):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    r = {
        "malformed": lambda: post(server, "/v1/chat/completions", None, raw=b'{"model": "x", "messages": ['),
        "wrong-type": lambda: post(server, "/v1/chat/completions", {**chat, "temperature": "hot"}),
        "unknown-model": lambda: post(server, "/v1/chat/completions", {**chat, "model": "gpt-9"}),
        "too-long": lambda: post(server, "/v1/completions", {"model": MODEL, "prompt": "word " * 400}),
        "max-tokens-0": lambda: post(server, "/v1/chat/completions", {**chat, "max_tokens": 0}),
        "max-tokens-huge": lambda: post(server, "/v1/chat/completions", {**chat, "max_tokens": 10**6}),
        "no-key": lambda: post(server, "/v1/chat/completions", chat, key=None),
        "wrong-key": lambda: post(server, "/v1/chat/completions", chat, key="nope"),
        "empty-messages": lambda: post(server, "/v1/chat/completions", {**chat, "messages": []}),
    }[case]()
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert fragment.lower() in error["message"].lower() and error["type"]
    # the server keeps serving
    assert post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2}).status_code == 200


def stream_text(url, prompt, n=16):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    text, done = "", False
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                text += json.loads(line[6:])["choices"][0]["text"]
    assert done
    return text


def test_32_concurrent_streams_equal_served_alone(server):
    prompts = ["The quick brown fox", "Mixture of experts", "Offloading keeps", "def hello(world):"]
    alone = {p: stream_text(server.url, p) for p in prompts}
    results: dict[int, str] = {}

    def worker(i):
        results[i] = stream_text(server.url, prompts[i % 4])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 32
    assert all(results[i] == alone[prompts[i % 4]] for i in range(32))


def test_queue_bound_429_and_disconnect_frees_the_worker(tiny_dir):
    import moe_offload
    from moe_offload.server.app import create_app

    engine = moe_offload.load(tiny_dir, device="cpu", dtype="float32", max_context=256)
    engine.model = SlowModel(engine.model, 0.05)  # ~20 tokens/s: 200 tokens take 10 s
    with ServerThread(create_app(engine, MODEL, max_queue=1)) as s:
        # greedy, this prompt runs the full 200 tokens on the tiny model (no early EOS)
        body = {"model": MODEL, "prompt": "Tell a long story", "max_tokens": 200, "temperature": 0, "stream": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # keep the iterator: dropping it closes the connection
            next(lines)  # the answer is streaming: the one queue place is taken
            busy = httpx.post(s.url + "/v1/completions", json={**body, "stream": False}, timeout=60)
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
        # the client left mid-stream: its place is freed promptly (well before the 10 s the answer needs)
        start = time.time()
        while httpx.get(s.url + "/metrics").json()["queue_depth"]:
            assert time.time() - start < 3, "the worker kept generating for a client that left"
            time.sleep(0.05)
        assert httpx.get(s.url + "/metrics").json()["cancelled"] == 1
        ok = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_serve_command(tiny_dir):
    """`moe-offload serve` for real: a subprocess on a free loopback port, queried with the openai client."""
    import os
    import subprocess
    import sys

    from openai import OpenAI
    from server_helpers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moe_offload", "serve", str(tiny_dir), "--port", str(port),
                             "--api-key", API_KEY, "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode() if proc.poll() else ""
            time.sleep(0.2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)
        name = tiny_dir.name
        assert [m.id for m in client.models.list().data] == [name]
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_every_family_served_offloaded(tmp_path, family):
    """Each family's tiny checkpoint, experts offloaded, answers through the openai client as the engine does."""
    import moe_offload
    from conftest import make_checkpoint
    from moe_offload.placement import OffloadOptions
    from moe_offload.server.app import create_app
    from openai import OpenAI

    directory = make_checkpoint(tmp_path / family, seed=2, family=family)
    engine = moe_offload.load(directory, device="cpu", dtype="float32", max_context=256,
                              offload=OffloadOptions(offload_per_layer=2))
    expected = engine.generate("Experts of every family", max_new_tokens=8, ignore_eos=False)
    with ServerThread(create_app(engine, family, api_key=API_KEY, max_queue=4)) as s:
        client = OpenAI(base_url=s.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        reply = client.completions.create(model=family, prompt="Experts of every family", max_tokens=8, temperature=0)
    assert expected.completion_tokens > 0
    assert reply.choices[0].text == expected.text and reply.usage.completion_tokens == expected.completion_tokens
    assert engine.cache_stats.summary()["misses"] > 0
