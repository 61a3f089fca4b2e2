"""scripts/train_demo_model.py, run for real on a tiny synthetic corpus on the CPU: transformers loads what it
writes, and moe_offload.load gives the same logits; the corpus extractor turns reST into plain text."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import hf_model

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the kernel module loads a driver for each device and the scheduler runs tasks on every CPU while "
         "memory pages are mapped into the address space of a process that reads files from the disk").split()


def write_corpus(directory: Path, docs: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)

    def paragraph() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 40))).capitalize() + "."

    def doc(i: int) -> dict:
        return {"source": f"synthetic/{i}", "title": f"Topic {i}", "sections": [
            {"title": f"Topic {i}", "text": paragraph()},
            *({"title": f"Part {k} of topic {i}", "text": paragraph() + "\n\n" + paragraph()} for k in range(2))]}

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.jsonl").write_text("".join(json.dumps(doc(i)) + "\n" for i in range(docs)))
    for name in ("valid", "test"):
        (directory / f"{name}.txt").write_text("\n\n".join(paragraph() for _ in range(6)) + "\n")
    (directory / "manifest.json").write_text(json.dumps({"packages": [
        {"name": "synthetic", "version": "0", "licence": "CC0-1.0", "files": "none"}], "held_out": "synthetic"}))
    return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("train")
    corpus = write_corpus(base / "corpus")
    extra = base / "extra.txt"
    extra.write_text("The scheduler runs tasks. " * 40)
    out = base / "model"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_demo_model.py"), "--tiny", "--max-steps", "12",
         "--corpus", str(corpus), "--out", str(out), "--eval-text", str(extra), "--device", "cpu",
         "--eval-every", "1000", "--context", "48", "--stride", "16", "--experts-impl", "auto"],
        capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", **_env()})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "perplexity on extra.txt" in result.stdout and "tok/s" in result.stdout
    return out


def _env() -> dict:
    import os

    return dict(os.environ)


def load_script(name: str):
    """A script of scripts/ as a module (they are not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_checkpoint_files_and_card(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    tokenizer_config = json.loads((trained / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] and tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    config = json.loads((trained / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert config["tie_word_embeddings"] is True
    card = (trained / "README.md").read_text()
    assert "synthetic" in card and "CC0-1.0" in card and "| extra.txt |" in card
    stats = json.loads((trained / "training.json").read_text())
    assert stats["steps"] == 12 and set(stats["scores"]) == {"valid", "test", "extra.txt"}


def test_transformers_and_moe_offload_agree(trained):
    import moe_offload

    engine = moe_offload.load(trained, device="cpu", dtype="float32", max_context=64)
    ids = engine.encode("The kernel module loads a driver for each device.")
    reference = hf_model(trained)(torch.tensor([ids])).logits[0]
    kv = engine.model.new_kv_cache(len(ids))
    ours = engine.model(torch.tensor([ids]), kv, 0)[0]
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_chat_template_from_tokenizer_config(trained):
    from moe_offload.text import Tokenizer
    from transformers import AutoTokenizer

    ours = Tokenizer(trained)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a driver?"}]
    ids = ours.apply_chat_template(messages)
    hf = AutoTokenizer.from_pretrained(str(trained))
    assert ids == list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    text = hf.decode(ids)
    assert text == "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nWhat is a driver?<|endoftext|>\n<|assistant|>\n"
    assert ours.eos_token_id == hf.convert_tokens_to_ids("<|endoftext|>")
    assert len(ids) < len(text) // 2  # the special tokens are single tokens


def test_sliding_windows_score_each_token_once():
    module = load_script("train_demo_model")
    for n, context, stride in [(10, 4, 2), (1000, 512, 256), (513, 512, 256), (7, 512, 256), (9, 3, 2)]:
        windows = module.sliding_windows(n, context, stride)
        scored = [t for _, end, first in windows for t in range(first, end)]
        assert scored == list(range(1, n)), (n, context, stride)
        assert all(end - begin <= context for begin, end, _ in windows)
        assert all(first - begin >= min(context - stride, first) for begin, _, first in windows)


def test_rst_to_plain_text():
    prep = load_script("prepare_demo_corpus")
    rst = """\
.. _label:

:mod:`json` --- JSON encoder
============================

.. module:: json
   :synopsis: Encode.

The :func:`~json.dumps` function writes ``str`` objects, see `RFC <https://example.org>`_ [#f1]_.
It is **fast**.

Example::

    >>> json.dumps(1)
    '1'

.. function:: dumps(obj, *, indent=None)

   Serialize *obj* to a string.

   .. versionadded:: 3.2

Details
-------

+-----+-----+
| a   | b   |
+-----+-----+

.. note::
   Keys are strings.

>>> 1 + 1
2

- first item
- second item of the list
"""
    sections = prep.parse_rst(rst)
    assert [s.title for s in sections] == ["json --- JSON encoder", "Details"]
    assert sections[0].paragraphs == [
        "The dumps function writes str objects, see RFC. It is fast.", "Example:",
        "dumps(obj, *, indent=None)", "Serialize obj to a string.", "New in version 3.2"]
    assert sections[1].paragraphs == ["Keys are strings.", "- first item", "- second item of the list"]
    text = prep.render(sections[0].title, sections)
    assert text.startswith("# json --- JSON encoder\n\nThe dumps function") and "\n\n## Details\n\n" in text
