"""Perplexity of held-out text: sliding windows over the token stream, each token scored once.

The windows are those of Hugging Face's perplexity guide: ``context`` tokens, moved ``stride`` tokens at a time.
Each window scores only the tokens that no earlier window scored, so every token but the first is scored exactly
once, with at least ``context - stride`` tokens of left context (all the tokens before it near the start). The
result is the exact token-weighted mean, computed from the engine's own forward (quantized and offloaded alike).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .errors import MoeOffloadError

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored: all but the first
    windows: int
    context: int
    stride: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over ``n`` tokens."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        first = max(prev_end, begin + 1)  # a token needs one before it; earlier windows scored up to prev_end
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


def check_window(context: int, stride: int) -> None:
    if context < 2:
        raise MoeOffloadError(f"--context {context} must be at least 2 tokens")
    if not 1 <= stride < context:
        raise MoeOffloadError(f"--stride {stride} must be at least 1 and smaller than --context {context}, so that "
                              "every scored token has tokens before it")


def perplexity(engine, token_ids: Sequence[int], context: int = 512, stride: int = 256,
               progress: Progress | None = None) -> PerplexityResult:
    """Perplexity of ``token_ids`` under ``engine``'s model (see the module docstring for the windows)."""
    check_window(context, stride)
    ids = [int(t) for t in token_ids]
    if len(ids) < 2:
        raise MoeOffloadError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    if context > engine.max_context:
        raise MoeOffloadError(f"--context {context} is longer than the model's context window ({engine.max_context} "
                              "tokens: max_position_embeddings in config.json, or --max-context); lower --context")
    model, device = engine.model, engine.device
    kv = model.new_kv_cache(context)
    plan = windows(len(ids), context, stride)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    start = time.perf_counter()
    for i, (begin, end, first) in enumerate(plan):
        x = torch.tensor([ids[begin:end]], dtype=torch.long, device=device)
        logits = model(x, kv, 0)[0, first - begin - 1 : end - begin - 1]  # [scored, V] float32: predict first..end-1
        logp = torch.log_softmax(logits, dim=-1)
        nll -= logp.gather(-1, x[0, first - begin : end - begin, None]).double().sum()
        if progress:
            progress("Perplexity", i + 1, len(plan))
    mean = float(nll) / (len(ids) - 1)  # float() waits for the device
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=len(ids) - 1, windows=len(plan),
                            context=context, stride=stride, seconds=time.perf_counter() - start)
