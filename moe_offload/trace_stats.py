"""What a routing trace says about offloading, without a model: cache hit rates per policy and cache size,
and the recall of speculative prefetch (the measurements of the paper's Figure 2).

Every replay is decode-style: token by token, layer by layer, from a cold cache, through the same policy
classes the runtime uses (offload/policy.py), so a hit rate here is the one the runtime would see.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import MoeOffloadError
from .offload.policy import POLICIES, SimulationResult, belady_hit_rate, make_policy, simulate
from .trace import RoutingTrace

YARDSTICK = "belady"  # the optimal cache that knows the future, beside the policies


def lru_hit_rates(trace: RoutingTrace, sizes: Iterable[int] | None = None) -> dict[int, SimulationResult]:
    """Per-layer LRU with ``size`` slots per layer, for each size (default 1..num_experts)."""
    return {n: simulate(make_policy("lru", trace.num_layers, n), trace)
            for n in check_sizes(trace, sizes)}


def policy_hit_rates(trace: RoutingTrace, sizes: Iterable[int] | None = None,
                     policies: Sequence[str] = (*POLICIES, YARDSTICK)) -> dict[str, dict[int, float]]:
    """policy -> slots per layer -> hit rate. ``global-lru`` gets the same total (slots x layers) to share."""
    sizes = check_sizes(trace, sizes)
    out: dict[str, dict[int, float]] = {}
    for name in policies:
        rates = {}
        for n in sizes:
            if name == YARDSTICK:
                rates[n] = belady_hit_rate(trace, trace.num_layers, n)
                continue
            slots = n * trace.num_layers if name == "global-lru" else n
            rates[n] = simulate(make_policy(name, trace.num_layers, slots), trace).hit_rate
        out[name] = rates
    return out


def prefetch_recall(trace: RoutingTrace, ahead: int) -> float:
    """Of the experts each layer used, the fraction the router of that layer, applied ``ahead`` MoE layers
    earlier, had in its top-k (what prefetch would have copied in time). Layers without a guess (the first
    ``ahead``) and skipped layers are not counted."""
    guessed, needed = _recall_counts(trace, ahead)
    return sum(guessed) / sum(needed) if sum(needed) else 0.0


def prefetch_recall_by_layer(trace: RoutingTrace, ahead: int) -> list[float | None]:
    """prefetch_recall per layer (None where the layer never had a guess)."""
    guessed, needed = _recall_counts(trace, ahead)
    return [g / n if n else None for g, n in zip(guessed, needed)]


def _recall_counts(trace: RoutingTrace, ahead: int) -> tuple[list[int], list[int]]:
    if trace.guesses is None:
        raise MoeOffloadError(f"trace {trace.source or '<memory>'} has no prefetch guesses (the shared CSV format "
                              "records none); record one with `moe-offload trace`")
    if not 1 <= ahead <= trace.lookahead:
        raise MoeOffloadError(f"trace {trace.source or '<memory>'} has guesses 1..{trace.lookahead} layers ahead, "
                              f"not {ahead}")
    guessed, needed = [0] * trace.num_layers, [0] * trace.num_layers
    for step, guesses in zip(trace.steps, trace.guesses):
        for layer in range(ahead, trace.num_layers):
            actual, guess = step[layer], guesses[ahead - 1][layer]
            if actual and guess:
                guessed[layer] += len(set(actual).intersection(guess))
                needed[layer] += len(actual)
    return guessed, needed


def check_sizes(trace: RoutingTrace, sizes: Iterable[int] | None) -> list[int]:
    """Cache sizes (slots per layer) to replay: default 1..num_experts; each must be 1..num_experts."""
    sizes = list(range(1, trace.num_experts + 1)) if sizes is None else sorted(set(sizes))
    bad = [n for n in sizes if not 1 <= n <= trace.num_experts]
    if bad or not sizes:
        raise MoeOffloadError(f"cache sizes {bad or sizes} must be 1..{trace.num_experts} (the trace's experts "
                              "per layer)")
    return sizes


def replay_tokens(trace: RoutingTrace) -> tuple[RoutingTrace, str]:
    """The tokens a decode-style replay should use, and how they were chosen: the decode tokens when the trace
    has any (the published numbers use those), else every token (e.g. ``moe-offload trace``'s text)."""
    decode = trace.decode_only()
    if len(decode):
        return decode, f"{len(decode)} decode tokens of {len(trace)}"
    return trace, f"all {len(trace)} tokens (no decode tokens)"


def trace_report(trace: RoutingTrace, sizes: Iterable[int] | None = None) -> dict:
    """Everything ``bench --trace`` shows, as JSON-ready data (keys are strings)."""
    tokens, chosen = replay_tokens(trace)
    sizes = check_sizes(trace, sizes)
    rates = policy_hit_rates(tokens, sizes)
    lru = lru_hit_rates(tokens, sizes)
    recall = {str(d): prefetch_recall(tokens, d) for d in range(1, tokens.lookahead + 1)} or None
    return {
        "trace": trace.source, "num_layers": trace.num_layers, "num_experts": trace.num_experts,
        "top_k": trace.top_k, "tokens": len(tokens), "replayed": chosen, "cache_sizes": sizes,
        "hit_rate": {name: {str(n): r for n, r in by_size.items()} for name, by_size in rates.items()},
        "lru_per_layer": {str(n): list(r.per_layer_hit_rate) for n, r in lru.items()},
        "prefetch_recall": recall,
        "prefetch_recall_per_layer": None if recall is None else
        {d: prefetch_recall_by_layer(tokens, int(d)) for d in recall},
    }
