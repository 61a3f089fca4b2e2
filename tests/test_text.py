"""Incremental detokenization and stop strings."""

import pytest

from moe_offload.text import IncrementalDetokenizer, StopStrings


@pytest.mark.parametrize("text", ["Grüße aus München! 日本語のテキスト 🙂🚀", "plain ascii text, nothing odd"])
def test_incremental_detokenizer_never_emits_half_characters(tiny_engine, text):
    tok = tiny_engine.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    if "🙂" in text:  # byte-level BPE splits the emoji: some steps must have held text back
        assert "" in pieces[:-1]


def test_stop_strings_hold_back_possible_prefixes():
    stops = StopStrings(["</end>", "STOP"])
    assert stops.push("hello <") == "hello "
    assert stops.push("/e") == ""
    assert stops.push("x") == "</ex"
    assert stops.push(" and ST") == " and "
    assert stops.push("OP more") == ""
    assert stops.stopped


def test_stop_string_inside_one_delta():
    stops = StopStrings(["\n\n"])
    assert stops.push("one\n\ntwo") == "one"
    assert stops.stopped


def test_no_stops_passes_through():
    stops = StopStrings([])
    assert stops.push("abc") == "abc" and not stops.stopped
