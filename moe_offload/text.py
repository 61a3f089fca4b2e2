"""Text in and out: the checkpoint's tokenizer and chat template, incremental detokenizing, stop strings."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .errors import MoeOffloadError


class Tokenizer:
    """The checkpoint's own tokenizer (via transformers' fast tokenizer) and its chat template."""

    def __init__(self, directory: Path):
        import transformers

        transformers.logging.set_verbosity_error()
        try:
            self._tok = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # transformers raises many types here; all mean "no usable tokenizer"
            raise MoeOffloadError(f"{directory}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
        self.directory = directory

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the conversation followed by the prompt for the assistant's next turn."""
        if not self.has_chat_template:
            raise MoeOffloadError(
                f"{self.directory}: the tokenizer has no chat template; use `generate` with a plain prompt"
            )
        try:
            ids = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a template error (e.g. roles out of order) is a user error
            raise MoeOffloadError(f"chat template of {self.directory}: {str(e).splitlines()[0]}") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, never emitting half of a multi-byte character.

    Decodes a short window of recent tokens and emits only text that is stable: byte-level tokens
    that end inside a UTF-8 sequence decode to U+FFFD and are held back until completed.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window whose text was already emitted up to read_offset
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        emitted = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(emitted) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character at the end of generation)."""
        emitted = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(emitted) :] if text.startswith(emitted) else ""


class StopStrings:
    """Finds stop strings in streamed text; holds back text that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Text safe to emit after adding ``delta``; sets ``stopped`` once a stop string appears."""
        if not self.stops:
            return delta
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.pending.endswith(s[:n])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
