"""Perplexity (moe_offload.evaluate and `moe-offload perplexity`) against transformers' own loss on the same windows."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CORPUS, hf_model
from typer.testing import CliRunner

from moe_offload.cli import app
from moe_offload.errors import MoeOffloadError
from moe_offload.evaluate import perplexity, windows

runner = CliRunner()
TEXT = " ".join(CORPUS[:12])


def hf_guide_perplexity(directory, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's perplexity guide with transformers' model and loss (float32), weighted exactly
    by the number of tokens each window scores."""
    model = hf_model(directory)
    n, nll, count, prev_end = len(ids), 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, n, stride):
            end = min(begin + context, n)
            target_len = end - prev_end
            x = torch.tensor([ids[begin:end]])
            labels = x.clone()
            labels[:, :-target_len] = -100
            scored = int((labels[:, 1:] != -100).sum())
            nll += float(model(x, labels=labels).loss) * scored
            count += scored
            prev_end = end
            if end == n:
                break
    return math.exp(nll / count), count


@pytest.mark.parametrize("context,stride", [(64, 24), (48, 47), (256, 128)])
def test_matches_transformers_on_the_same_windows(tiny_dir, tiny_engine, context, stride):
    ids = tiny_engine.encode(TEXT)  # 422 tokens: several windows each time
    context = min(context, tiny_engine.max_context)
    ours = perplexity(tiny_engine, ids, context, stride)
    reference, count = hf_guide_perplexity(tiny_dir, ids, context, stride)
    assert ours.tokens == count == len(ids) - 1
    assert abs(ours.perplexity - reference) / reference < 1e-4
    assert ours.windows == len(windows(len(ids), context, stride)) > 1
    assert ours.nll == pytest.approx(math.log(reference), rel=1e-4)


def test_windows_score_every_token_once_with_left_context():
    for n, context, stride in [(2, 2, 1), (10, 4, 2), (1000, 512, 256), (513, 512, 256), (7, 512, 256), (50, 9, 4)]:
        plan = windows(n, context, stride)
        assert [t for _, end, first in plan for t in range(first, end)] == list(range(1, n))
        for begin, end, first in plan:
            assert end - begin <= context and (first - begin >= context - stride or begin == 0)


def test_progress_and_errors(tiny_engine):
    seen = []
    result = perplexity(tiny_engine, list(range(3, 40)), 16, 8,
                        progress=lambda description, done, total: seen.append((done, total)))
    assert seen[-1] == (result.windows, result.windows) and len(seen) == result.windows
    for args, fragment in [(([5], 16, 8), "at least 2"), ((list(range(10)), 16, 16), "--stride 16"),
                           ((list(range(10)), 1, 1), "--context 1"), ((list(range(10)), 300, 8), "context window")]:
        with pytest.raises(MoeOffloadError, match=fragment):
            perplexity(tiny_engine, *args)


def test_quantized_engine(tiny_dir, tiny_engine):
    import moe_offload

    ids = tiny_engine.encode(TEXT)
    quantized = moe_offload.load(tiny_dir, device="cpu", dtype="float32", max_context=64, quantize="4/4")
    q, full = perplexity(quantized, ids, 64, 32), perplexity(tiny_engine, ids, 64, 32)
    assert q.perplexity != full.perplexity and abs(math.log(q.perplexity / full.perplexity)) < 0.2


def test_cli_perplexity_json(tiny_dir, tiny_engine, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    out = tmp_path / "ppl.json"
    result = runner.invoke(app, ["perplexity", str(tiny_dir), "--text", str(text), "--context", "64", "--stride", "32",
                                 "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    expected = perplexity(tiny_engine, tiny_engine.encode(TEXT), 64, 32)
    assert data["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert data["tokens"] == expected.tokens and data["context"] == 64 and data["stride"] == 32
    assert data["preset"] is None and data["text"] == str(text) and data["dtype"] == "float32"
    assert f"{expected.perplexity:.3f}" in result.stdout
    limited = runner.invoke(app, ["perplexity", str(tiny_dir), "--text", str(text), "--context", "64",
                                  "--max-tokens", "40", "--quantize", "4/4", "--json", str(out)])
    assert limited.exit_code == 0, limited.output
    data = json.loads(out.read_text())
    assert data["tokens"] == 39 and data["preset"] == "4/4"


def test_cli_perplexity_errors(tiny_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    cases = [
        (["--text", str(tmp_path / "missing.txt")], "no such file"),
        (["--text", str(empty)], "is empty"),
        (["--text", str(binary)], "UTF-8"),
        (["--text", str(text), "--stride", "0"], "--stride 0"),
        (["--text", str(text), "--context", "64", "--stride", "64"], "smaller than --context"),
        (["--text", str(text), "--context", "1"], "--context 1"),
        (["--text", str(text), "--context", "1024"], "context window"),
        (["--text", str(text), "--max-tokens", "1"], "--max-tokens 1"),
    ]
    for args, fragment in cases:
        result = runner.invoke(app, ["perplexity", str(tiny_dir), "--device", "cpu", *args])
        assert result.exit_code == 1, (args, result.output)
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], (args, result.stderr)
