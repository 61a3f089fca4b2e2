"""The demo model as the default MODEL of chat, generate, bench, serve and perplexity (conftest's tiny checkpoint
stands in for it), and the shipped demo model itself once the checkout has it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CORPUS, hf_model
from typer.testing import CliRunner

from moe_offload.cli import app

runner = CliRunner()


@pytest.fixture
def demo(monkeypatch, tiny_dir):
    monkeypatch.setattr("moe_offload.demo.DEMO_MODEL", tiny_dir)
    return tiny_dir


def test_generate_defaults_to_the_demo_model(demo, tiny_engine):
    result = runner.invoke(app, ["generate", "-p", "Hello", "--temperature", "0", "--max-new-tokens", "6", "--json",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tokens"] == tiny_engine.generate("Hello", max_new_tokens=6).tokens


def test_chat_defaults_to_the_demo_model(demo, tiny_engine):
    from moe_offload import SamplingParams

    result = runner.invoke(app, ["chat", "--temperature", "0", "--max-new-tokens", "6"], input="Hello\n/exit\n")
    assert result.exit_code == 0, result.output
    expected = tiny_engine.new_chat().send("Hello", SamplingParams(max_new_tokens=6)).result().text
    assert result.stdout == f">>> {expected}\n>>> " and "demo model" in result.stderr


def test_perplexity_defaults_to_the_demo_model(demo, tiny_engine, tmp_path):
    from moe_offload.evaluate import perplexity

    text = tmp_path / "t.txt"
    text.write_text(" ".join(CORPUS[:6]))
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["perplexity", "--text", str(text), "--context", "32", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    expected = perplexity(tiny_engine, tiny_engine.encode(text.read_text()), 32, 16)
    assert data["model"] == "demo" and data["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)


def test_bench_defaults_to_the_demo_model(demo, tmp_path):
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", "--device", "cpu", "--prompt-tokens", "16", "--new-tokens", "4",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["model"] == str(demo) and data["decode_tok_s"] > 0
    both = runner.invoke(app, ["bench", str(demo), "--synthetic", "tiny"])
    assert both.exit_code == 1 and "not both" in both.stderr


def test_serve_defaults_to_the_demo_model(demo, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda served, **kwargs: calls.append((served, kwargs)))
    result = runner.invoke(app, ["serve", "--device", "cpu", "--port", "8123"])
    assert result.exit_code == 0, result.output
    assert "serving moe-offload-demo" in result.stderr and calls[0][1]["port"] == 8123
    models = TestClient(calls[0][0]).get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["moe-offload-demo"]


def test_missing_demo_model_is_a_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setattr("moe_offload.demo.DEMO_MODEL", tmp_path / "absent")
    text = tmp_path / "t.txt"
    text.write_text("Some held-out text.")
    for args, hint in [(["generate", "-p", "x"], "pass MODEL"), (["chat"], "pass MODEL"),
                       (["serve"], "pass MODEL"), (["bench"], "--synthetic NAME"),
                       (["perplexity", "--text", str(text)], "pass MODEL")]:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and "demo model is not installed" in lines[0] and hint in lines[0], result.stderr


def _shipped():
    from moe_offload.demo import DEMO_MODEL

    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip("the trained demo model is not in this checkout yet")
    return DEMO_MODEL


def test_shipped_demo_model_is_small_and_documented():
    directory = _shipped()
    size = sum(p.stat().st_size for p in directory.iterdir())
    assert size < 27 * 10**6, f"the demo model takes {size / 1e6:.1f} MB; keep it under ~25 MB"
    card = (directory / "README.md").read_text()
    for fragment in ("## Data", "licence", "Held-out perplexity", "wikitext-2-test.txt", "minutes"):
        assert fragment in card, fragment
    assert json.loads((directory / "tokenizer_config.json").read_text())["chat_template"]


def test_shipped_demo_model_matches_transformers_and_chats():
    import moe_offload

    directory = _shipped()
    engine = moe_offload.load(directory, device="cpu", dtype="float32", max_context=256)
    ids = engine.encode("The scheduler decides which task runs next on each CPU.")
    ours = engine.model(torch.tensor([ids]), engine.model.new_kv_cache(len(ids)), 0)[0]
    torch.testing.assert_close(ours, hf_model(directory)(torch.tensor([ids])).logits[0], rtol=1e-4, atol=1e-4)
    answer = engine.chat([{"role": "user", "content": "What is a kernel module?"}], max_new_tokens=24, temperature=0)
    assert answer.completion_tokens > 0 and answer.text.strip()
