"""Trace analysis (hit rates per cache size, prefetch recall) against brute-force counts, and `bench --trace`."""

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moe_offload.cli import app
from moe_offload.errors import MoeOffloadError
from moe_offload.trace import RoutingTrace, read_trace
from moe_offload.trace_stats import (check_sizes, lru_hit_rates, policy_hit_rates, prefetch_recall,
                                     prefetch_recall_by_layer, replay_tokens, trace_report)

FIXTURE = Path(__file__).parent / "fixtures" / "tiny4.trace.jsonl"
DEMO_FIXTURE = Path(__file__).parent / "fixtures" / "demo.trace.jsonl"


def brute_lru(steps, layer: int, size: int) -> tuple[int, int]:
    """(hits, uses) of one layer's LRU cache of ``size`` experts, as a plain list (least recent first).
    A token's own experts are never evicted for each other; a miss with no evictable slot stays uncached."""
    cache, hits, uses = [], 0, 0
    for step in steps:
        chosen = step[layer]
        for e in chosen:
            uses += 1
            if e in cache:
                hits += 1
                cache.remove(e)
                cache.append(e)
            elif len(cache) < size:
                cache.append(e)
            else:
                victims = [c for c in cache if c not in chosen]
                if victims:
                    cache.remove(victims[0])
                    cache.append(e)
    return hits, uses


def brute_recall(trace: RoutingTrace, ahead: int) -> float:
    found = needed = 0
    for t, step in enumerate(trace.steps):
        for layer in range(trace.num_layers):
            guess = trace.guesses[t][ahead - 1][layer]
            if step[layer] and guess:
                found += sum(e in guess for e in step[layer])
                needed += len(step[layer])
    return found / needed


def random_trace(seed=0, tokens=60, layers=3, experts=6, k=2, lookahead=2) -> RoutingTrace:
    rng = random.Random(seed)
    hot = [rng.sample(range(experts), 3) for _ in range(layers)]  # some reuse, like real routing

    def pick():
        return [rng.sample(range(experts), k) if rng.random() < 0.3 else rng.sample(h, k) for h in hot]

    steps = [pick() for _ in range(tokens)]
    steps[5][2] = []  # a skipped layer
    guesses = [[[[] if layer < d else g for layer, g in enumerate(pick())] for d in range(1, lookahead + 1)]
               for _ in range(tokens)]
    return RoutingTrace(layers, experts, k, steps, ["decode"] * tokens, "random", guesses=guesses)


def test_lru_by_hand():
    trace = RoutingTrace(1, 4, 1, [[[e]] for e in (1, 2, 1, 3, 2, 1)])
    # size 2: miss miss hit miss(evicts 2) miss(evicts 1) miss(evicts 3)
    assert lru_hit_rates(trace, [1, 2, 3])[2].hit_rate == 1 / 6
    assert lru_hit_rates(trace, [3])[3].hit_rate == 3 / 6  # only the three first uses miss


@pytest.mark.parametrize("seed", [0, 1])
def test_lru_matches_brute_force(seed):
    trace = random_trace(seed)
    results = lru_hit_rates(trace)
    assert sorted(results) == list(range(1, 7))
    for size, result in results.items():
        counts = [brute_lru(trace.steps, layer, size) for layer in range(trace.num_layers)]
        assert result.per_layer_hit_rate == pytest.approx([h / u for h, u in counts])
        assert result.hit_rate == pytest.approx(sum(h for h, _ in counts) / sum(u for _, u in counts))


def test_recall_by_hand_and_brute_force():
    steps = [[[0, 1], [2, 3], [0, 3]], [[1, 2], [0, 1], []]]
    # token 0, d=1: layer 1 finds 2 of {2, 3}, layer 2 finds 3 of {0, 3}; d=2: layer 2 finds both
    # token 1, d=1: layer 1 finds 1 of {0, 1}; layer 2 skipped the token, so neither d counts it
    guesses = [[[[], [2, 0], [3, 1]], [[], [], [0, 3]]],
               [[[], [1, 3], [2, 3]], [[], [], [1, 2]]]]
    trace = RoutingTrace(3, 4, 2, steps, guesses=guesses)
    assert prefetch_recall(trace, 1) == (1 + 1 + 1) / 6
    assert prefetch_recall_by_layer(trace, 1) == [None, 2 / 4, 1 / 2]
    assert prefetch_recall(trace, 2) == 2 / 2  # only token 0's layer 2 counts
    for seed in (0, 1):
        rand = random_trace(seed)
        for d in (1, 2):
            assert prefetch_recall(rand, d) == pytest.approx(brute_recall(rand, d))


def test_recall_needs_guesses():
    with pytest.raises(MoeOffloadError, match="trace t.csv has no prefetch guesses"):
        prefetch_recall(RoutingTrace(2, 4, 2, [[[0, 1], [2, 3]]], source="t.csv"), 1)
    with pytest.raises(MoeOffloadError, match="guesses 1..2 layers ahead, not 3"):
        prefetch_recall(random_trace(), 3)


def test_sizes_and_token_choice():
    trace = random_trace()
    assert check_sizes(trace, [3, 1, 3]) == [1, 3]
    with pytest.raises(MoeOffloadError, match=r"cache sizes \[7\] must be 1..6"):
        check_sizes(trace, [1, 7])
    mixed = RoutingTrace(1, 4, 1, [[[0]], [[1]], [[2]]], ["prefill", "decode", "decode"])
    assert replay_tokens(mixed)[0].steps == [[[1]], [[2]]]
    prefill_only = RoutingTrace(1, 4, 1, [[[0]], [[1]]], ["prefill", "prefill"])
    assert replay_tokens(prefill_only) == (prefill_only, "all 2 tokens (no decode tokens)")


def test_global_lru_gets_the_same_total():
    trace = random_trace()
    rates = policy_hit_rates(trace, [2], policies=["global-lru", "lru", "lfu", "belady"])
    assert set(rates) == {"global-lru", "lru", "lfu", "belady"}
    assert rates["belady"][2] >= max(rates[p][2] for p in ("lru", "lfu", "global-lru"))


@pytest.mark.parametrize("fixture, tokens", [(FIXTURE, 768), (DEMO_FIXTURE, 1024)], ids=["tiny4", "demo"])
def test_fixture_numbers_are_computed(fixture, tokens):
    """The paper's Figure 2 measurements (LRU hit rate per cache size, prefetch recall 1 and 2 layers ahead) on
    the shipped traces: the demo model's real routing on held-out text, and a random tiny model's."""
    trace = read_trace(fixture)
    assert (trace.num_layers, trace.num_experts, trace.top_k, trace.lookahead) == (4, 8, 2, 2)
    assert len(trace) == tokens and trace.weights is not None
    rates = lru_hit_rates(trace, range(1, 9))
    assert all(0 <= r.hit_rate <= 1 for r in rates.values())
    # With every expert fitting, only first uses miss.
    uses = sum(len(c) for s in trace.steps for c in s)
    first_uses = len({(l, e) for s in trace.steps for l, c in enumerate(s) for e in c})
    assert rates[8].hit_rate == pytest.approx(1 - first_uses / uses)
    for d in (1, 2):
        assert 0 < prefetch_recall(trace, d) < 1
        assert prefetch_recall(trace, d) == pytest.approx(brute_recall(trace, d))
    report = trace_report(trace, [1, 2, 8])
    assert set(report["hit_rate"]) == {"lru", "global-lru", "lfu", "belady"}
    assert report["hit_rate"]["lru"]["8"] == rates[8].hit_rate and set(report["prefetch_recall"]) == {"1", "2"}


def test_bench_trace_cli(tmp_path):
    out = tmp_path / "t.json"
    result = CliRunner().invoke(app, ["bench", "--trace", str(FIXTURE), "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    trace = read_trace(FIXTURE)
    assert data["cache_sizes"] == list(range(1, 9)) and data["tokens"] == 768
    assert data["hit_rate"]["lru"]["3"] == lru_hit_rates(trace, [3])[3].hit_rate
    assert data["prefetch_recall"]["2"] == prefetch_recall(trace, 2)
    assert "LRU per layer" in result.stdout and "2 layers ahead" in result.stderr
    sizes = CliRunner().invoke(app, ["bench", "--trace", str(FIXTURE), "--cache-sizes", "2,5-6", "--json", str(out)])
    assert sizes.exit_code == 0 and json.loads(out.read_text())["cache_sizes"] == [2, 5, 6]


@pytest.mark.parametrize("args, fragment", [
    (["--trace", "missing.csv"], "cannot read routing trace missing.csv"),
    (["--trace", str(FIXTURE), "--synthetic", "tiny"], "--trace replays a trace without a model"),
    (["--trace", str(FIXTURE), "--cache-sizes", "9"], "cache sizes [9] must be 1..8"),
    (["--trace", str(FIXTURE), "--cache-sizes", "a"], "--cache-sizes 'a'"),
    (["--synthetic", "tiny", "--cache-sizes", "2"], "--cache-sizes goes with --trace"),
])
def test_bench_trace_errors(args, fragment):
    result = CliRunner().invoke(app, ["bench", *args])
    assert result.exit_code == 1
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
