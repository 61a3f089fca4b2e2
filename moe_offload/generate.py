"""Prefill and decode over a KV cache; streamed tokens; multi-turn sessions that reuse the cache.

Generation knows only ``model(tokens, kv, start) -> logits``: where experts live is not its business.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .errors import MoeOffloadError
from .graphs import GraphedDecode
from .model import MoeTransformer
from .sampling import SamplingParams, make_generator, sample
from .text import IncrementalDetokenizer, StopStrings, Tokenizer


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One step of a stream: the new token (None for the final flush of held-back text) and its text."""

    token_id: int | None
    text: str


@dataclass
class Completion:
    text: str
    tokens: list[int]  # generated ids (an EOS that ended generation included)
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prefill_s: float
    decode_s: float
    cached_prompt_tokens: int = 0  # prompt tokens whose KV was reused rather than prefilled

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    @property
    def prefill_tok_s(self) -> float:
        new = self.prompt_tokens - self.cached_prompt_tokens
        return new / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes out of prefill; decode time covers the ones after it.
        steps = len(self.tokens) - 1
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else 0.0


class Session:
    """A KV cache and the exact tokens it holds. A new prompt reuses the longest common prefix."""

    def __init__(self, model: MoeTransformer, max_context: int, prefill_chunk: int = 512,
                 cuda_graphs: bool = False):
        self.model = model
        self.kv = model.new_kv_cache(max_context)
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.tokens: list[int] = []
        self.device = model.device
        # Decode steps replay each layer's dense part from a CUDA graph (see graphs.py).
        self.decoder = GraphedDecode(model, self.kv) if cuda_graphs and self.device.type == "cuda" else None

    def _forward(self, ids: Sequence[int]) -> torch.Tensor:
        """Feed ids after the cached tokens; returns the last position's logits [V]."""
        t = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        logits = self.model(t, self.kv, len(self.tokens), last_only=True)
        self.tokens.extend(ids)
        self.kv.length = len(self.tokens)
        return logits[0, -1]

    def check_prompt(self, ids: Sequence[int]) -> None:
        if not ids:
            raise MoeOffloadError("the prompt is empty; give at least one token of text")
        if len(ids) >= self.max_context:
            raise MoeOffloadError(
                f"the prompt has {len(ids)} tokens but the context window is {self.max_context} "
                f"(including room to answer); shorten the prompt or raise --max-context"
            )

    def prefill(self, ids: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Make the cache hold exactly ``ids``; return (last logits [V], number of reused tokens)."""
        self.check_prompt(ids)
        common = 0
        for a, b in zip(self.tokens, ids[:-1]):  # keep >= 1 token to compute the next logits from
            if a != b:
                break
            common += 1
        self.kv.truncate(common)
        del self.tokens[common:]
        for i in range(common, len(ids), self.prefill_chunk):
            logits = self._forward(ids[i : i + self.prefill_chunk])
        return logits, common

    def step(self, token: int) -> torch.Tensor:
        if self.decoder is None or len(self.tokens) >= self.max_context:
            return self._forward([token])
        logits = self.decoder.step(token, len(self.tokens))
        self.tokens.append(token)
        self.kv.length = len(self.tokens)
        return logits

    def reset(self) -> None:
        self.kv.truncate(0)
        self.tokens.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generation:
    """An iterable of TokenEvents; ``completion`` is set once it is exhausted.

    Breaking out early (Ctrl-C, a client that disconnects) leaves the session consistent: the cache
    holds exactly the tokens fed so far, and ``text`` holds what was emitted.
    """

    def __init__(self, session: Session, tokenizer: Tokenizer, prompt_ids: Sequence[int],
                 params: SamplingParams, eos_ids: Sequence[int]):
        session.check_prompt(prompt_ids)
        self.session, self.tokenizer, self.params = session, tokenizer, params
        self.prompt_ids = list(prompt_ids)
        self._started = False
        self.eos_ids = set() if params.ignore_eos else set(eos_ids)
        self.completion: Completion | None = None
        self.text = ""
        self.tokens: list[int] = []

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._started:  # a generation runs once; iterating again yields nothing
            return
        self._started = True
        for event in self._run():
            self.text += event.text
            yield event

    def result(self) -> Completion:
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion

    def _run(self) -> Iterator[TokenEvent]:
        session, params = self.session, self.params
        generator = make_generator(params.seed, session.device)
        detok, stops = IncrementalDetokenizer(self.tokenizer), StopStrings(params.stop)
        _sync(session.device)
        t0 = time.perf_counter()
        logits, cached = session.prefill(self.prompt_ids)
        token = int(sample(logits[None], params, generator))
        t1 = time.perf_counter()
        finish = "length"
        while True:
            self.tokens.append(token)
            if token in self.eos_ids:
                finish = "stop"
                break
            text = stops.push(detok.push(token))
            yield TokenEvent(token, text)
            if stops.stopped:
                finish = "stop"
                break
            if len(self.tokens) >= params.max_new_tokens or len(session.tokens) >= session.max_context:
                break
            token = int(sample(session.step(token)[None], params, generator))
        t2 = time.perf_counter()
        if not stops.stopped:
            tail = stops.push(detok.flush()) + stops.flush()
            if tail:
                yield TokenEvent(None, tail)
        self.completion = Completion(
            text=self.text, tokens=list(self.tokens), prompt_tokens=len(self.prompt_ids), finish_reason=finish,
            prefill_s=t1 - t0, decode_s=t2 - t1, cached_prompt_tokens=cached,
        )


@dataclass
class ChatSession:
    """A multi-turn conversation whose KV cache carries over: each turn prefills only what is new."""

    session: Session
    tokenizer: Tokenizer
    eos_ids: tuple[int, ...]
    messages: list[dict[str, str]] = field(default_factory=list)
    system: str | None = None

    def __post_init__(self):
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.session.reset()

    def send(self, user_text: str, params: SamplingParams) -> Generation:
        """Start the assistant's answer to ``user_text``; iterate the result to stream it."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            prompt = self.tokenizer.apply_chat_template(self.messages)
            generation = Generation(self.session, self.tokenizer, prompt, params, self.eos_ids)
        except MoeOffloadError:
            self.messages.pop()
            raise
        return _RecordingGeneration(generation, self.messages)


class _RecordingGeneration(Generation):
    """A Generation that appends the answer (even a partial, interrupted one) to the conversation."""

    def __init__(self, inner: Generation, messages: list[dict[str, str]]):
        self.__dict__.update(inner.__dict__)
        self._messages = messages

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._started:
            return
        try:
            yield from super().__iter__()
        finally:
            self._messages.append({"role": "assistant", "content": self.text})
