"""Routing hooks the engine installs on the model's MoE blocks (``MoEBlock.routing_hook``): record what the
routers choose, with the look-ahead guesses speculative prefetch would make, or replay a recorded trace in
place of the routers.

A hook runs after the router and before the experts, eagerly: a per-layer graphed decode step (graphs.py)
captures the router but never the experts, so it sees the replayed routing too. Only batch 1.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Sequence

import torch

from .errors import MoeOffloadError
from .generate import Session
from .model import MoeTransformer
from .trace import RoutingTrace, TraceRecorder, check_matches

Progress = Callable[[str, int, int], None]
LOOKAHEAD = 2  # guesses recorded for the next 1 and 2 MoE layers (the paper's Figure 2, right)


class _Hooks:
    """Installs ``self._hook(layer, x, weights, indices)`` on every MoE block; a context manager removes them."""

    def __init__(self, model: MoeTransformer):
        self.blocks = model.moe_blocks()

    def install(self):
        for i, block in enumerate(self.blocks):
            if block.routing_hook is not None:
                raise MoeOffloadError("a routing hook is already installed on this model (record or replay, not both)")
            block.routing_hook = partial(self._hook, i)
        return self

    def remove(self) -> None:
        for block in self.blocks:
            block.routing_hook = None

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _hook(self, layer: int, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor):
        raise NotImplementedError


class RoutingRecorder(_Hooks):
    """Records each MoE layer's chosen experts and weights, and the top-k that the routers of the next
    ``lookahead`` MoE layers pick from this layer's input (what prefetch guesses). Routing is unchanged."""

    def __init__(self, model: MoeTransformer, lookahead: int = LOOKAHEAD, source: str = "recorded"):
        super().__init__(model)
        c = model.config
        self.lookahead = lookahead
        self.recorder = TraceRecorder(len(self.blocks), c.num_experts, c.top_k, source, lookahead)

    def _hook(self, layer, x, weights, indices):
        ahead = {d: self.blocks[layer + d].router(x)[1] for d in range(1, self.lookahead + 1)
                 if layer + d < len(self.blocks)}
        self.recorder.record(layer, indices.tolist(), weights.float().tolist(),
                             {d: guess.tolist() for d, guess in ahead.items()})
        return weights, indices

    def trace(self) -> RoutingTrace:
        return self.recorder.trace()


def record_trace(model: MoeTransformer, tokens: Sequence[int], context: int, lookahead: int = LOOKAHEAD,
                 source: str = "recorded", progress: Progress | None = None) -> RoutingTrace:
    """Teacher-forced routing of ``tokens``: windows of ``context`` tokens, each prefilled from an empty KV
    cache, every token's routing recorded (phase "prefill": the text was given, not generated)."""
    if context < 1:
        raise MoeOffloadError(f"--context {context} must be at least 1")
    if not tokens:
        raise MoeOffloadError("no tokens to trace; the text is empty")
    session = Session(model, context + 1, cuda_graphs=False)  # a prompt must leave room for one more token
    recorder = RoutingRecorder(model, lookahead, source)
    recorder.recorder.phase = "prefill"
    with recorder:
        for start in range(0, len(tokens), context):
            session.reset()
            session.prefill(list(tokens[start : start + context]))
            if progress is not None:
                progress("Recording routing", min(start + context, len(tokens)), len(tokens))
    return recorder.trace()


class TraceReplay(_Hooks):
    """Routes the token at position p (from the last ``rewind()``) as the trace's p-th complete token, wrapping
    around at its end. Complete tokens have every layer (the shared CSVs skip the last layer for most prompt
    tokens). The trace's top-k is used, whatever the model's; weights are the trace's, or 1/k when it has none.
    The routers still run (prefetch keeps guessing with them), their choice is replaced.

    ``rewind(warmup=True)`` replays the same tokens with every expert id shifted by E/2: the same shapes and
    buffers (kernels compile, graphs are captured), other experts, so a warm-up run does not leave the
    measured run's experts in the cache."""

    def __init__(self, model: MoeTransformer, trace: RoutingTrace):
        super().__init__(model)
        c = model.config
        check_matches(trace, len(self.blocks), c.num_experts)
        keep = [i for i, step in enumerate(trace.steps) if all(step)]
        if not keep:
            raise MoeOffloadError(f"trace {trace.source}: no token routes every layer; nothing to replay")
        self.trace, self.model_top_k = trace.select(keep), c.top_k
        device = model.device
        self.indices = torch.tensor(self.trace.steps, dtype=torch.long, device=device)  # [N, L, K]
        if self.trace.weights is not None:
            self.weights = torch.tensor(self.trace.weights, dtype=torch.float32, device=device)  # [N, L, K]
        else:
            self.weights = torch.full(self.indices.shape, 1.0 / trace.top_k, dtype=torch.float32, device=device)
        # Decode routing goes through fixed buffers, one pair per layer: graphs captured downstream (the grouped
        # expert kernels' per-layer graphs) read their inputs by address, so the address must not change.
        K = trace.top_k
        self._decode_w = torch.zeros(len(self.blocks), 1, K, dtype=torch.float32, device=device)  # [L, 1, K]
        self._decode_i = torch.zeros(len(self.blocks), 1, K, dtype=torch.long, device=device)  # [L, 1, K]
        self._shifted = (self.indices + c.num_experts // 2) % c.num_experts  # [N, L, K] warm-up routing
        self._table = self.indices
        self.cursor = 0  # position of the next token
        self._start = 0  # position of the forward pass's first token

    def __len__(self) -> int:
        return len(self.trace)

    def rewind(self, warmup: bool = False) -> None:
        """A new sequence starts: its first token replays the trace's first complete token (with shifted expert
        ids if ``warmup``)."""
        self.cursor = 0
        self._table = self._shifted if warmup else self.indices

    def _hook(self, layer, x, weights, indices):
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # A graph would freeze one token's routing into every replay.
            raise RuntimeError("trace replay cannot be captured in a CUDA graph; capture only the router")
        T, N = x.shape[0], len(self)
        if layer == 0:  # MoE layers run in order: the first one starts the pass
            self._start, self.cursor = self.cursor, self.cursor + T
        if T == 1:  # decode: two small device-to-device copies into this layer's fixed buffers
            s = self._start % N
            w, i = self._decode_w[layer], self._decode_i[layer]
            w.copy_(self.weights[s, layer, None])
            i.copy_(self._table[s, layer, None])
            return w, i
        rows = (torch.arange(self._start, self._start + T) % N).to(self.indices.device)
        return self.weights[rows, layer], self._table[rows, layer]  # [T, K]

    def describe(self, sequence: int | None = None) -> str:
        """What the replay does, for the output and the JSON; ``sequence``: tokens per run (prompt + new)."""
        t = self.trace
        phases = {p: t.phases.count(p) for p in ("prefill", "decode") if p in t.phases}
        made = " + ".join(f"{n} {p}" for p, n in phases.items()) or "phases unknown"
        k = (f"top-{t.top_k} from the trace (the model's own top-{self.model_top_k} unused)"
             if t.top_k != self.model_top_k else f"top-{t.top_k}")
        weights = "the trace's weights" if t.weights is not None else f"weights 1/{t.top_k} (the trace has none)"
        text = (f"trace {t.source}: {len(t)} complete tokens ({made}), {k}, {weights}; token at position p "
                f"replays trace token p mod {len(t)}; warm-up with expert ids shifted by E/2; prefetch guesses come "
                "from the model's routers")
        if sequence is not None and sequence > len(t):
            text += (f"; WRAPS: {sequence} tokens per run exceed the trace's {len(t)}, so the decode replays tokens "
                     "the prompt already routed (flatters the hit rate; keep prompt + new tokens within the trace)")
        return text
