"""Offloading must not change outputs: logits and greedy tokens bit-identical to the resident model,
for every policy, prefetch depth and budget. On CPU the "device" slots are plain memory."""

import warnings

import pytest
import torch

import moe_offload
from moe_offload.flat import FlatLayout
from moe_offload.offload import store as store_module
from moe_offload.offload.store import ExpertStore
from moe_offload.placement import OffloadOptions


def load(directory, offload=None, quantize=None):
    return moe_offload.load(directory, device="cpu", dtype="float32", offload=offload, quantize=quantize)


def run(engine, prompt="Mixture of experts route tokens", n=24):
    ids = engine.encode(prompt)
    kv = engine.model.new_kv_cache(64)
    prefill = engine.model(torch.tensor([ids]), kv, 0)  # [1, S, V]
    completion = engine.generate(prompt, max_new_tokens=n, ignore_eos=True)
    return prefill, completion.tokens


@pytest.fixture(scope="module")
def resident(tiny_dir):
    return run(load(tiny_dir))


@pytest.mark.parametrize("options", [
    OffloadOptions(offload_per_layer=3, prefetch=0),  # exactly one slot per layer (top-2 routing)
    OffloadOptions(offload_per_layer=2, prefetch=1),
    OffloadOptions(offload_per_layer=1, prefetch=2),
    OffloadOptions(offload_per_layer=2, policy="lfu", prefetch=1),
    OffloadOptions(gpu_memory="900KiB", policy="global-lru", prefetch=1),
    OffloadOptions(offload_per_layer=0, prefetch=1),  # every expert has a slot, still through the cache
], ids=lambda o: f"{o.policy}-off{o.offload_per_layer}-mem{o.gpu_memory}-pf{o.prefetch}")
def test_offloaded_is_bit_identical(tiny_dir, resident, options):
    engine = load(tiny_dir, options)
    assert engine.plan is not None and engine.cache_stats is not None
    prefill, tokens = run(engine)
    assert torch.equal(prefill, resident[0])
    assert tokens == resident[1]
    s = engine.cache_stats.summary()
    assert s["hits"] + s["misses"] > 0 and s["bytes_copied"] > 0
    if options.prefetch:
        assert 0 < s["prefetch_recall"] <= 1
        if options.offload_per_layer != 0:  # with a slot for every expert, there is nothing to prefetch
            assert s["prefetch_copies"] > 0
    else:
        assert s["prefetch_copies"] == 0


def test_offloaded_quantized_is_bit_identical(tiny_dir):
    base = run(load(tiny_dir, quantize="4/2"))
    offloaded = run(load(tiny_dir, OffloadOptions(offload_per_layer=2, prefetch=1), quantize="4/2"))
    assert torch.equal(offloaded[0], base[0]) and offloaded[1] == base[1]


def test_stats_are_consistent(tiny_dir):
    engine = load(tiny_dir, OffloadOptions(offload_per_layer=2, prefetch=0))
    engine.generate("Hello", max_new_tokens=10, ignore_eos=True)
    stats = engine.cache_stats
    total = stats.total()
    layout_bytes = engine.expert_cache.store.layout.nbytes
    # every miss and bypass is one copy of one expert's buffer; without prefetch nothing else is copied
    assert total.bytes_copied == (total.misses - 0) * layout_bytes
    assert stats.tokens == len(engine.encode("Hello")) + 9  # prefill tokens + fed decode tokens
    # a cold start misses first: at least one miss per layer; later hits exist (2 of 4 experts cached)
    assert all(layer.misses >= 1 for layer in stats.layers) and total.hits > 0
    assert stats.summary()["host_syncs_per_token"] <= engine.config.num_layers


def test_everything_fits_means_resident(tiny_dir):
    engine = load(tiny_dir, OffloadOptions(gpu_memory="1GiB"))
    assert engine.plan is None and engine.cache_stats is None


def test_pinned_allocation_failure_falls_back_to_pageable(monkeypatch):
    def fail(nbytes):
        raise RuntimeError("cudaHostAlloc failed: out of memory")

    monkeypatch.setattr(store_module, "allocate_pinned", fail)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # pretend a GPU exists so pinning is tried
    layout = FlatLayout.of({"w": torch.zeros(4, 8)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = ExpertStore(layout, [(0, e) for e in range(5)], pin=True, chunk_bytes=layout.nbytes * 2)
    assert not store.pinned
    assert len([w for w in caught if "pinned host memory unavailable" in str(w.message)]) == 1  # one warning
    store.put((0, 3), {"w": torch.full((4, 8), 3.0)})
    assert torch.equal(layout.views(store.buffer((0, 3)))["w"], torch.full((4, 8), 3.0))


def test_store_chunks_and_layout_views():
    layout = FlatLayout.of({"a": torch.zeros(3, dtype=torch.int32), "b": torch.zeros(2, 5, dtype=torch.float16)})
    assert layout.nbytes % 64 == 0
    store = ExpertStore(layout, [(l, e) for l in range(2) for e in range(3)], pin=False,
                        chunk_bytes=layout.nbytes * 4)
    for key in store.keys():
        store.put(key, {"a": torch.tensor([key[0], key[1], 7], dtype=torch.int32),
                        "b": torch.full((2, 5), key[1], dtype=torch.float16)})
    for key in store.keys():  # no expert's buffer overlaps another's
        views = layout.views(store.buffer(key))
        assert views["a"].tolist() == [key[0], key[1], 7] and views["b"].eq(key[1]).all()


def test_cli_json_reports_cache_fields(tiny_dir):
    import json

    from typer.testing import CliRunner

    from moe_offload.cli import app

    result = CliRunner().invoke(app, ["generate", str(tiny_dir), "-p", "Hello", "--temperature", "0",
                                      "--max-new-tokens", "6", "--json", "--offload-per-layer", "2"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert 0 <= data["hit_rate"] < 1 and data["bytes_copied_per_token"] > 0 and "prefetch_recall" in data
    resident = CliRunner().invoke(app, ["generate", str(tiny_dir), "-p", "Hello", "--temperature", "0",
                                        "--max-new-tokens", "6", "--json"])
    assert json.loads(resident.stdout)["tokens"] == data["tokens"]
    assert json.loads(resident.stdout)["hit_rate"] == 1.0


def test_no_prefetch_from_pageable_memory_to_a_gpu():
    """A copy from pageable memory blocks the host until staged: speculative copies only cost there."""
    from moe_offload.placement import prefetch_depth

    with pytest.warns(RuntimeWarning, match="pageable"):
        assert prefetch_depth(2, pinned=False, device=torch.device("cuda")) == 0
    assert prefetch_depth(2, pinned=True, device=torch.device("cuda")) == 2
    assert prefetch_depth(1, pinned=False, device=torch.device("cpu")) == 1  # CPU "copies" are memcpys anyway
    assert prefetch_depth(0, pinned=False, device=torch.device("cuda")) == 0


def test_prefetch_waits_for_an_idle_copy_queue(tiny_dir, resident, monkeypatch):
    """While copies are in flight, guesses are scored but not copied: outputs and misses are those of no prefetch."""
    from moe_offload.offload.cache import ExpertCache

    monkeypatch.setattr(ExpertCache, "copies_idle", lambda self: False)
    engine = load(tiny_dir, OffloadOptions(offload_per_layer=2, prefetch=1))
    prefill, tokens = run(engine)
    assert torch.equal(prefill, resident[0]) and tokens == resident[1]
    s = engine.cache_stats.summary()
    assert s["prefetch_copies"] == 0 and 0 < s["prefetch_recall"] <= 1  # guesses still measured


def test_prefill_stages_the_next_layers_streamed_experts(tiny_dir, resident, monkeypatch):
    """A long prefill chunk needs every expert: those of the next layer that will get no slot are copied into the
    scratch slots while this layer computes, and their use finds them there. Outputs stay bit-identical, and
    nothing is copied that is not used."""
    engine = load(tiny_dir, OffloadOptions(offload_per_layer=3, prefetch=0))  # one slot per layer: 3 streamed
    cache = engine.expert_cache
    staged, used = [], []
    stage, acquire = cache.stage, cache._acquire

    events = []
    model = engine.model
    embed = model.embed

    def spy_stage(layer, experts):
        stage(layer, experts)
        staged.extend(k for k in cache._staged if k[0] == layer)
        events.append(("stage", layer))

    def spy_acquire(layer, expert):
        if (layer, expert) in cache._staged:
            used.append((layer, expert))
        return acquire(layer, expert)

    def spy_embed(tokens):
        events.append(("embed", tokens.shape[1]))
        return embed(tokens)

    monkeypatch.setattr(cache, "stage", spy_stage)
    monkeypatch.setattr(cache, "_acquire", spy_acquire)
    monkeypatch.setattr(model, "embed", spy_embed)
    prefill, _ = run(engine, n=1)
    assert torch.equal(prefill, resident[0])
    assert staged and set(staged) <= set(used)  # every staged expert was used from its scratch slot
    # The first layer's streamed experts are staged before the prefill's embedding, attention and routing
    first = events.index(next(e for e in events if e[0] == "embed" and e[1] > 1))
    assert ("stage", 0) in events[:first] and any(k[0] == 0 for k in staged)
    t = engine.cache_stats.total()
    assert t.bytes_copied == t.misses * cache.store.layout.nbytes  # staging copied nothing extra


def test_prefill_streams_cpu_layers_through_the_spare_scratch_slots(tiny_dir, resident):
    """With CPU layers every other layer keeps all its experts; the budget's spare slots widen the scratch ring that a
    prefill streams the CPU layers' experts through, while decode keeps its ring of top_k. Prefill stays exact."""
    engine = load(tiny_dir, OffloadOptions(gpu_memory="1GiB", cpu_layers=1, hybrid="on"))
    cache = engine.expert_cache
    config = engine.model.config
    assert len(cache._scratch) == max(2, config.top_k) and len(cache._prefill_scratch) == config.num_experts
    used: dict[bool, set[int]] = {True: set(), False: set()}
    next_scratch = cache._next_scratch

    def spy():
        slot = next_scratch()
        used[cache.prefilling].add(slot)
        return slot

    cache._next_scratch = spy
    prefill, _ = run(engine, n=4)
    assert torch.equal(prefill, resident[0])
    assert len(used[True]) > len(cache._scratch)  # the prefill ran further ahead than decode's ring allows
    assert used[False] <= set(cache._scratch)
