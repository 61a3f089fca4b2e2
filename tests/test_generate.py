"""Generation against transformers' generate, sampling reproducibility, stops, and multi-turn KV reuse."""

import pytest
import torch

from conftest import hf_model
from moe_offload import MoeOffloadError, SamplingParams


@pytest.mark.parametrize("prompt", ["The quick brown fox", "Grüße 🙂", "def hello(world):"])
def test_greedy_equals_transformers_generate(tiny_dir, tiny_engine, prompt):
    ids = tiny_engine.encode(prompt)
    ref = hf_model(tiny_dir).generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                      eos_token_id=2, pad_token_id=2)[0, len(ids):].tolist()
    ours = tiny_engine.generate(prompt, max_new_tokens=24).tokens
    assert ours == ref


def test_seeded_sampling_is_reproducible(tiny_engine):
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234, max_new_tokens=16, ignore_eos=True)
    a, b = tiny_engine.generate("Hello", params).tokens, tiny_engine.generate("Hello", params).tokens
    c = tiny_engine.generate("Hello", params, seed=99).tokens
    assert a == b and a != c


def test_top_k_one_is_greedy(tiny_engine):
    greedy = tiny_engine.generate("Mixture", max_new_tokens=12, ignore_eos=True).tokens
    sampled = tiny_engine.generate("Mixture", temperature=1.5, top_k=1, seed=3, max_new_tokens=12,
                                   ignore_eos=True).tokens
    assert sampled == greedy


def test_stop_string_ends_generation_and_is_not_emitted(tiny_engine):
    full = tiny_engine.generate("Hello", max_new_tokens=30, ignore_eos=True)
    stop = full.text[5:7]
    assert stop and full.text.find(stop) >= 0
    cut = tiny_engine.generate("Hello", max_new_tokens=30, ignore_eos=True, stop=(stop,))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_length_finish_and_streamed_text_equals_result(tiny_engine):
    generation = tiny_engine.stream("Offloading", max_new_tokens=9, ignore_eos=True)
    pieces = [e.text for e in generation]
    c = generation.completion
    assert c.finish_reason == "length" and c.completion_tokens == 9
    assert "".join(pieces) == c.text == tiny_engine.tokenizer.decode(c.tokens)
    assert c.prefill_tok_s > 0 and c.decode_tok_s > 0


def test_eos_stops(tiny_engine):
    ids = tiny_engine.encode("The quick")
    free = tiny_engine.generate(ids, max_new_tokens=6, ignore_eos=True).tokens
    # Make the third generated token "EOS" and check generation stops right there.
    engine = tiny_engine
    saved = engine.eos_ids
    engine.eos_ids = (free[2],)
    try:
        c = engine.generate(ids, max_new_tokens=6)
    finally:
        engine.eos_ids = saved
    assert c.tokens == free[:3] and c.finish_reason == "stop"
    assert c.text == engine.tokenizer.decode(free[:2])


def test_prompt_longer_than_context_is_a_clear_error(tiny_engine):
    with pytest.raises(MoeOffloadError, match=r"prompt has \d+ tokens but the context window is 256"):
        tiny_engine.generate("word " * 400)


def test_generation_stops_at_context_end(tiny_dir):
    import moe_offload

    engine = moe_offload.load(tiny_dir, device="cpu", dtype="float32", max_context=20)
    c = engine.generate(list(range(3, 18)), max_new_tokens=100, ignore_eos=True)
    assert c.finish_reason == "length" and c.completion_tokens == 20 - 15 + 1


def test_multi_turn_chat_reuses_kv_and_matches_reprefill(tiny_engine):
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    chat = tiny_engine.new_chat(system="You are terse.")
    answers = []
    for turn, user in enumerate(["Hello there", "Tell me about experts", "And offloading?"]):
        generation = chat.send(user, params)
        c = generation.result()
        answers.append(c)
        if turn:
            assert c.cached_prompt_tokens > 0  # the earlier turns were not prefilled again
        # Re-prefilling the whole conversation from scratch gives the same answer.
        fresh = tiny_engine.new_session()
        from moe_offload.generate import Generation

        prompt = tiny_engine.tokenizer.apply_chat_template(chat.messages[:-1])
        again = Generation(fresh, tiny_engine.tokenizer, prompt, params, tiny_engine.eos_ids).result()
        assert again.cached_prompt_tokens == 0
        assert again.tokens == c.tokens
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "You are terse."}]


def test_interrupted_answer_keeps_session_consistent(tiny_engine):
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    chat = tiny_engine.new_chat()
    generation = chat.send("Hello", params)
    for i, _ in enumerate(generation):
        if i == 3:
            break
    generation_iter = None  # noqa: F841
    del generation
    import gc

    gc.collect()
    assert chat.messages[-1]["role"] == "assistant"
    second = chat.send("Again", params).result()
    assert second.completion_tokens == 10
