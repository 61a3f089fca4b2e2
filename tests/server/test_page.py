"""The chat page in a real browser: Debian's headless Chromium driven by Selenium, against the real server
(uvicorn on a free loopback port) serving the tiny checkpoint with its experts offloaded on the CPU.

Two models: the tiny model itself, slowed down so that streams, stops and cache changes can be watched;
and an "echo" model whose forward pass is the tiny model's own (experts are routed and copied as usual)
but whose logits spell a reply built from the prompt the server received (turn count, system prompt, last
user message), so the test knows every word the page must show and can check what the page sent.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest
import torch

import moe_offload
from moe_offload.placement import OffloadOptions
from moe_offload.server.app import create_app
from server_helpers import API_KEY, MODEL, ServerThread, SlowModel

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # gitignored
OFFLOAD = OffloadOptions(offload_per_layer=2, prefetch=1)  # 2 GPU slots for 4 experts a layer: constant churn
MARKDOWN = """Here is **bold**, *italic* and `inline code`.

### A heading
- first item
- second item

```python
def hello(world):
    return world * 2
```

| expert | state |
|---|---|
| 0 | on the GPU |

[docs](https://example.com/docs)"""


def browser_or_skip() -> None:
    """Locally the browser tests may skip; in CI (CI set) a missing browser is a failure."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        message = f"browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class EchoModel:
    """The tiny model's forward pass, with logits forced to spell ``reply(prompt)`` then EOS."""

    def __init__(self, model, tokenizer, eos: int, delay: float = 0.01):
        self._model, self._tokenizer, self._eos, self._delay = model, tokenizer, eos, delay
        self._script: list[int] = []
        self._step = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, tokens, kv, start, last_only=False):
        time.sleep(self._delay)  # >= 10 ms a token, so that even a short answer streams visibly
        logits = self._model(tokens, kv, start, last_only=last_only)
        if start == 0:  # the server starts every request from an empty KV cache: this is the prompt
            ids = tokens[0].tolist()
            reply = echo_reply(self._tokenizer.decode(ids), ids.count(self._eos))
            self._script, self._step = self._tokenizer.encode(reply, add_special_tokens=False) + [self._eos], 0
        forced = torch.full_like(logits, -1e4)
        forced[..., self._script[min(self._step, len(self._script) - 1)]] = 0.0
        self._step += 1
        return forced


def echo_reply(prompt: str, answers: int) -> str:
    """What the echo model says, from the chat template's text (tests/conftest.py: [INST] ... [/INST])."""
    users = re.findall(r"\[INST\] (.*?) \[/INST\]", prompt, re.DOTALL)
    system = prompt.split("[INST]")[0].strip() or "none"
    reply = f"Turn {len(users)}. System: '{system}'. Earlier answers: {answers}. You said: {users[-1]}"
    return reply + "\n\n" + MARKDOWN if "markdown" in users[-1] else reply


def offloaded_engine(directory: Path, max_context: int = 256):
    return moe_offload.load(directory, device="cpu", dtype="float32", max_context=max_context, offload=OFFLOAD)


@pytest.fixture(scope="module")
def slow_server(tiny_dir):
    engine = offloaded_engine(tiny_dir)
    engine.model = SlowModel(engine.model, 0.03)  # ~30 tokens/s: answers take long enough to watch and stop
    with ServerThread(create_app(engine, MODEL)) as s:
        s.engine = engine
        yield s


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    from conftest import make_checkpoint

    # room for a few turns of scripted answers (the shared tiny checkpoint has 256 positions)
    engine = offloaded_engine(make_checkpoint(tmp_path_factory.mktemp("echo") / "model",
                                              max_position_embeddings=2048), max_context=2048)
    engine.model = EchoModel(engine.model, engine.tokenizer, engine.tokenizer.eos_token_id)
    with ServerThread(create_app(engine, MODEL)) as s:
        yield s


@pytest.fixture(scope="module")
def key_server(tiny_engine):
    with ServerThread(create_app(tiny_engine, MODEL, api_key=API_KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,860",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never runs, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


# ---------- helpers ----------

def wait(driver, condition, timeout: float = 20, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def open_page(driver, url: str, ready: bool = True) -> None:
    driver.get(url + "/")
    if ready:
        wait(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true",
             message="the page did not connect")


def settings(driver, **values: str) -> None:
    if not by_id(driver, "settings").is_displayed():
        by_id(driver, "settings-toggle").click()
    for element_id, value in values.items():
        field = by_id(driver, element_id.replace("_", "-"))
        field.clear()
        field.send_keys(value)
    by_id(driver, "settings-toggle").click()  # close; the values are read when a message is sent


def send(driver, text: str) -> int:
    """Type and send a message; returns the number of the assistant message that will answer it."""
    n = len(css(driver, ".message.assistant"))
    box = by_id(driver, "prompt")
    box.clear()
    box.send_keys(text)
    by_id(driver, "send").click()
    wait(driver, lambda d: len(css(d, ".message.assistant")) == n + 1)
    return n


def watch_answer(driver, index: int, timeout: float = 30) -> tuple[list[str], list[str]]:
    """Until answer ``index`` finishes: the distinct texts it showed and the expert grids seen meanwhile."""
    texts, grids = [], []
    deadline = time.time() + timeout
    while time.time() < deadline:
        finished, text, grid = driver.execute_script(  # one round trip, so that no stage is missed
            "const a = document.querySelectorAll('.message.assistant')[arguments[0]];"
            "return [a.dataset.finish || null, a.querySelector('.body').innerText, "
            "document.getElementById('grid').dataset.state || null];", index)
        if finished:
            return texts, grids
        if text and (not texts or texts[-1] != text):
            texts.append(text)
        if grid and (not grids or grids[-1] != grid):
            grids.append(grid)
        time.sleep(0.02)
    raise AssertionError(f"answer {index} did not finish in {timeout} s")


def answer(driver, index: int):
    return css(driver, ".message.assistant")[index]


def metrics(server) -> dict:
    return httpx.get(server.url + "/metrics").json()


# ---------- the endpoint and headers (no browser) ----------

def test_page_files_and_security_headers(key_server):
    page = httpx.get(key_server.url + "/")  # no key: the page must load to ask for one
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "unsafe-inline" not in csp and "http" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "<script" not in re.sub(r'<script type="module" src="/static/app.js"></script>', "", page.text)
    for name in ("app.js", "markdown.js", "style.css", "favicon.svg"):
        r = httpx.get(f"{key_server.url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-security-policy"] == csp, name
    assert "javascript" in httpx.get(key_server.url + "/static/app.js").headers["content-type"]
    assert httpx.get(key_server.url + "/page.json").json() == {"api_key_required": True}
    assert httpx.get(key_server.url + "/static/../server/app.py").status_code == 404
    # the data needs the key
    assert httpx.get(key_server.url + "/v1/experts").status_code == 401
    view = httpx.get(key_server.url + "/v1/experts", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert view["offloaded"] is False and view["grid"] == ["gggg", "gggg"] and view["layers"] == [0, 1]


def test_experts_endpoint_follows_the_cache(slow_server):
    engine = slow_server.engine
    cache = engine.expert_cache
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}
    assert httpx.post(slow_server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    view = httpx.get(slow_server.url + "/v1/experts").json()
    assert view["offloaded"] is True and view["layers"] == [0, 1] and view["num_experts"] == 4
    resident = {(layer, e) for layer, row in enumerate(view["grid"]) for e, s in enumerate(row) if s in "gf"}
    assert resident == cache.policy.resident() and len(resident) == cache.num_slots == 4
    assert {(layer, e) for layer, row in enumerate(view["grid"]) for e, s in enumerate(row) if s == "f"} \
        == cache.prefetched
    summary = engine.cache_stats.summary()
    assert view["hit_rate"] == summary["hit_rate"] and view["tokens"] == engine.cache_stats.tokens > 0
    assert view["bytes_copied_per_token"] == summary["bytes_copied_per_token"] > 0
    assert view["prefetch_recall"] == summary["prefetch_recall"]
    assert view["busy"] is False and view["tokens_per_s"] == metrics(slow_server)["last_decode_tok_s"] > 0
    assert set(view["legend"]) == {"g", "f", "c", "h", "p"} and sum(view["counts"].values()) == 8


def test_expert_rows_are_the_moe_layers():
    """Layers 0 and 2 dense: the grid shows decoder layers 1 and 3, however the cache numbers them."""
    from types import SimpleNamespace

    from moe_offload.server.page import expert_snapshot

    def engine(keys, resident):
        policy = SimpleNamespace(resident=lambda: set(resident), slot_of=lambda key: 0 if key in resident else None)
        cache = SimpleNamespace(store=SimpleNamespace(keys=lambda: keys), policy=policy, prefetched=set(),
                                ready=[None])
        return SimpleNamespace(config=SimpleNamespace(num_layers=4, num_experts=2, moe_layers=(1, 3)),
                               expert_cache=cache)

    moe_numbered = engine([(l, e) for l in range(2) for e in range(2)], {(1, 1)})
    decoder_numbered = engine([(l, e) for l in range(4) for e in range(2)], {(3, 1)})
    for fake in (moe_numbered, decoder_numbered):
        snap, layers = expert_snapshot(fake)
        assert layers == [1, 3] and snap.grid == ("hh", "hg")
    snap, layers = expert_snapshot(SimpleNamespace(config=moe_numbered.config, expert_cache=None))
    assert layers == [1, 3] and snap.grid == ("gg", "gg")


# ---------- in the browser ----------

def test_conversation_markdown_and_screenshot(browser, echo_server):
    open_page(browser, echo_server.url)
    assert by_id(browser, "model").text == MODEL
    settings(browser, system="Be brief.", temperature="0", max_tokens="400")

    first = send(browser, "Hello there")
    texts, _ = watch_answer(browser, first)
    expected = "Turn 1. System: 'Be brief.'. Earlier answers: 0. You said: Hello there"
    assert answer(browser, first).find_element("css selector", ".body").text == expected
    assert answer(browser, first).get_attribute("data-finish") == "stop"
    assert len(texts) >= 3 and all(expected.startswith(t) for t in texts), texts  # it streamed, in order

    second = send(browser, "Now some markdown please")
    watch_answer(browser, second)
    reply = answer(browser, second)
    body = reply.find_element("css selector", ".body")
    # the page sent the whole conversation: the model saw two user turns and its own first answer
    assert body.find_element("css selector", "p").text.startswith(
        "Turn 2. System: 'Be brief.'. Earlier answers: 1. You said: Now some markdown please")
    assert body.find_element("css selector", "strong").text == "bold"
    assert body.find_element("css selector", "em").text == "italic"
    assert body.find_element("css selector", "p code").text == "inline code"
    assert body.find_element("css selector", "h5").text == "A heading"  # "###": headings start below the page's
    assert [li.text for li in body.find_elements("css selector", "ul li")] == ["first item", "second item"]
    assert body.find_element("css selector", "pre code").get_attribute("textContent") == \
        "def hello(world):\n    return world * 2"
    assert [td.text for td in body.find_elements("css selector", "td")] == ["0", "on the GPU"]
    link = body.find_element("css selector", "a")
    assert link.get_attribute("href") == "https://example.com/docs" and "noopener" in link.get_attribute("rel")
    assert "tokens" in reply.find_element("css selector", ".note").text

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "chat-page.png"))
    assert (ARTIFACTS / "chat-page.png").stat().st_size > 10_000

    by_id(browser, "new-chat").click()
    assert css(browser, ".message") == []
    again = send(browser, "Fresh start")
    watch_answer(browser, again)
    assert answer(browser, again).text.startswith("Turn 1. System: 'Be brief.'. Earlier answers: 0.")
    assert console_errors(browser) == []


def test_model_output_is_shown_as_text_never_as_html(browser, echo_server):
    open_page(browser, echo_server.url)
    attack = ("<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
              "<b>not bold</b> [x](javascript:document.title='pwned')")
    watch_answer(browser, send(browser, attack))
    body = answer(browser, 0).find_element("css selector", ".body")
    assert attack in body.text  # the echo model said it back, character for character
    assert css(browser, "#messages script, #messages img, #messages b, #messages a") == []
    assert browser.title == "moe-offload"
    assert console_errors(browser) == []


def test_streaming_updates_the_expert_grid(browser, slow_server):
    open_page(browser, slow_server.url)
    legend = [li.text for li in css(browser, "#legend li")]
    assert "computed on the CPU" in legend and "being copied to the GPU" in legend and len(legend) == 5
    assert len(css(browser, "#grid .cell")) == 8
    settings(browser, temperature="0", max_tokens="40")
    texts, grids = watch_answer(browser, send(browser, "Tell me about experts"))
    assert len(texts) >= 3, texts  # streamed
    assert len(set(grids)) >= 2, grids  # the grid changed while tokens streamed
    note = answer(browser, 0).find_element("css selector", ".note").text
    # the same request through the API: greedy, so the same number of tokens
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about experts"}],
            "max_tokens": 40, "temperature": 0}
    usage = httpx.post(slow_server.url + "/v1/chat/completions", json=body, timeout=60).json()["usage"]
    assert note.startswith(f"{usage['completion_tokens']} tokens")
    wait(browser, lambda d: by_id(d, "stat-speed").text not in ("", "–"))
    assert re.fullmatch(r"\d+\.\d%", by_id(browser, "stat-hit-rate").text)
    assert re.fullmatch(r"\d+\.\d%", by_id(browser, "stat-recall").text)
    assert re.fullmatch(r"[\d.]+ (B|KiB|MiB)", by_id(browser, "stat-bytes").text)
    cells = css(browser, "#grid .cell")
    assert sum(c.get_attribute("data-state") in ("g", "f") for c in cells) == 4  # every GPU slot is filled
    assert console_errors(browser) == []


def test_stop_cancels_the_job_on_the_server(browser, slow_server):
    open_page(browser, slow_server.url)
    settings(browser, temperature="0", max_tokens="200")  # ~7 s at this speed, with no early EOS
    before = metrics(slow_server)
    index = send(browser, "Tell me about experts")
    wait(browser, lambda d: len(answer(d, index).find_element("css selector", ".body").text) > 3)
    by_id(browser, "stop").click()
    wait(browser, lambda d: answer(d, index).get_attribute("data-finish") == "stopped", timeout=5)
    assert by_id(browser, "send").is_displayed() and not by_id(browser, "stop").is_displayed()
    start = time.time()
    while (m := metrics(slow_server))["cancelled"] == before["cancelled"] or m["queue_depth"]:
        assert time.time() - start < 3, "the server kept generating after the page stopped"
        time.sleep(0.05)
    assert m["cancelled"] == before["cancelled"] + 1 and m["completed"] == before["completed"]
    assert "stopped" in answer(browser, index).find_element("css selector", ".note").text
    # the worker is free: the next message is answered at once, with the stopped answer kept as history
    settings(browser, max_tokens="5")
    watch_answer(browser, send(browser, "And now?"), timeout=10)
    assert answer(browser, index + 1).get_attribute("data-finish") == "length"
    assert console_errors(browser) == []


def test_content_security_policy_blocks_inline_script(browser, slow_server):
    open_page(browser, slow_server.url)
    ran = browser.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
        "document.body.append(s); return window.injected === 1;")
    assert ran is False
    assert any("Content Security Policy" in e for e in console_errors(browser))


def test_api_key_prompt(browser, key_server):
    open_page(browser, key_server.url, ready=False)
    dialog = by_id(browser, "key-dialog")
    wait(browser, lambda d: dialog.get_attribute("open") is not None, message="no API key prompt")
    assert not by_id(browser, "prompt").is_enabled()

    by_id(browser, "key-input").send_keys("wrong-key")
    by_id(browser, "key-submit").click()
    wait(browser, lambda d: "API key" in by_id(d, "key-error").text, message="a wrong key was accepted")
    assert dialog.get_attribute("open") is not None

    by_id(browser, "key-input").send_keys(API_KEY)
    by_id(browser, "key-submit").click()
    wait(browser, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "true")
    assert dialog.get_attribute("open") is None and by_id(browser, "model").text == MODEL
    # a fully resident model: every expert shown on the GPU
    wait(browser, lambda d: len(css(d, "#grid .cell.s-g")) == 8)
    assert "every expert is resident" in by_id(browser, "expert-note").text
    settings(browser, max_tokens="4")
    watch_answer(browser, send(browser, "Hi"))
    assert answer(browser, 0).get_attribute("data-finish") in ("stop", "length")
    # the only console errors are the refused wrong key
    assert all("401" in e for e in console_errors(browser))
