"""Device lookup: with CPU layers, the layers between them find their experts in a device table and read misses in
place, reaching the host only at CPU layers. Outputs must not change by a bit; the table must follow the cache."""

import json

import pytest
import torch
from typer.testing import CliRunner

import moe_offload
from moe_offload.cli import app
from moe_offload.errors import MoeOffloadError
from moe_offload.placement import OffloadOptions, cuda_runtime_bytes

from conftest import make_checkpoint

STEPS = 10


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("deep") / "model", num_hidden_layers=4, num_local_experts=8)


def load(directory, slots_per_cached_layer=3, cpu_layers=2, device="cpu", dtype="float32", **offload):
    """The 4/2 model with ``cpu_layers`` CPU layers and a budget of that many slots per other layer."""
    probe = moe_offload.load(directory, device=device, dtype=dtype, quantize="4/2",
                             offload=OffloadOptions(cpu_layers=cpu_layers, force=True))
    p = probe.plan
    cached = p.num_layers - cpu_layers
    del probe
    torch.cuda.empty_cache() if device == "cuda" else None
    # the probe had no budget, so no CUDA runtime share: an explicit budget must leave it (placement.py)
    runtime = cuda_runtime_bytes(torch.device(device))
    budget = p.used_bytes - p.experts_total_bytes + runtime + (slots_per_cached_layer * cached) * p.expert_bytes
    budget += p.expert_bytes // 2  # the runtime share is measured again at the load: a little room
    engine = moe_offload.load(directory, device=device, dtype=dtype, quantize="4/2",
                              offload=OffloadOptions(gpu_memory=budget, cpu_layers=cpu_layers, **offload))
    assert engine.plan.cpu_layers == cpu_layers
    assert all(n in (0, slots_per_cached_layer) for n in engine.plan.layer_slots), engine.plan.layer_slots
    return engine


def decode(engine, steps=STEPS):
    session = engine.new_session()
    logits = session.prefill(list(range(3, 40)))[0]
    engine.cache_stats.reset()
    out, tokens = [logits], []
    for _ in range(steps):
        tokens.append(int(logits.argmax()))
        logits = session.step(tokens[-1])
        out.append(logits)
    return tokens, torch.stack(out)


def table_matches_cache(cache) -> bool:
    table = cache.table.cpu()
    for key, host in cache._host_index.items():
        slot = cache.policy.slot_of(key)
        if int(table[key]) != (host if slot is None else slot):
            return False
    return True


@pytest.fixture(scope="module")
def host_lookup(deep_dir):
    engine = load(deep_dir, device_lookup="off")
    assert engine.expert_cache.table is None
    return decode(engine)


def test_device_lookup_is_bit_identical_to_host_lookup(deep_dir, host_lookup):
    engine = load(deep_dir, device_lookup="on")
    cache = engine.expert_cache
    assert cache.table is not None and table_matches_cache(cache)
    tokens, logits = decode(engine)
    assert tokens == host_lookup[0]
    assert torch.equal(logits, host_lookup[1])  # CPU layers compute alike; the other layers' experts are the same bytes
    assert table_matches_cache(cache)


def test_lookups_reach_the_statistics_and_misses_are_read_in_place(deep_dir):
    engine = load(deep_dir, device_lookup="on")
    cpu = set(engine.plan.cpu_layer_ids)
    assert cpu == {0, 2}
    decode(engine)
    stats, k = engine.cache_stats, engine.config.top_k
    # CPU layer 2 catches up with layer 1 within the step; CPU layer 0 with layer 3 at the next step, so the last
    # step's layer 3 is still pending
    for layer, steps in ((1, STEPS), (3, STEPS - 1)):
        s = stats.layers[layer]
        assert s.hits + s.misses == steps * k, (layer, s)
        assert s.in_place == s.misses > 0  # three slots of eight: misses happen, and none is copied on demand
    assert stats.tokens == STEPS
    assert stats.host_syncs == STEPS * len(cpu)  # the CPU layers only
    # each CPU layer guesses (top-k + 1) for the layer after it and copies the guesses while it computes; nothing
    # else is copied at decode
    for layer in (1, 3):
        s = stats.layers[layer]
        assert s.prefetch_copies > 0 and s.bytes_copied == s.prefetch_copies * engine.plan.expert_bytes
        assert s.guessed == (k + 1) * (STEPS if layer == 1 else STEPS - 1)
    assert engine.cache_stats.summary()["in_place_per_token"] > 0


def test_prefill_after_decode_keeps_table_and_outputs(deep_dir, host_lookup):
    """Prefill takes the copy path (it evicts and fills slots); the table must follow, and a second request gives
    the same result as the first."""
    engine = load(deep_dir, device_lookup="on")
    first = decode(engine)
    second = decode(engine)
    assert first[0] == second[0] == host_lookup[0]
    assert torch.equal(first[1], second[1])
    assert table_matches_cache(engine.expert_cache)


def test_one_cpu_layer_catches_up_with_all_others(deep_dir):
    engine = load(deep_dir, cpu_layers=1, device_lookup="on")
    (cpu,) = engine.plan.cpu_layer_ids
    catch_up = engine.model.moe_blocks()[cpu].experts.catch_up
    assert sorted(catch_up) == [l for l in range(4) if l != cpu]
    decode(engine)
    for layer in catch_up:  # the CPU layer is layer 0: it catches up with the previous step's layers
        s = engine.cache_stats.layers[layer]
        assert s.hits + s.misses == (STEPS - 1) * engine.config.top_k


@pytest.mark.parametrize("options, message", [
    (dict(device_lookup="on"), "--device-lookup on needs --cpu-layers"),
    (dict(device_lookup="maybe", cpu_layers=1), "--device-lookup 'maybe' is not one of off, auto, on"),
])
def test_bad_device_lookup(deep_dir, options, message):
    with pytest.raises(MoeOffloadError, match=message):
        moe_offload.load(deep_dir, device="cpu", dtype="float32", quantize="4/2",
                         offload=OffloadOptions(force=True, **options))


def test_auto_is_off_without_cuda(deep_dir):
    engine = moe_offload.load(deep_dir, device="cpu", dtype="float32", quantize="4/2",
                              offload=OffloadOptions(cpu_layers=1, force=True))
    assert engine.expert_cache.table is None


def test_cli_generate_json_reports_misses_read_in_place(deep_dir):
    engine = load(deep_dir, device_lookup="on")  # for its budget
    budget = engine.plan.budget_bytes
    result = CliRunner().invoke(app, ["generate", str(deep_dir), "-p", "Hello", "--temperature", "0", "--device", "cpu",
                                      "--dtype", "float32", "--quantize", "4/2", "--gpu-memory", f"{budget}B",
                                      "--cpu-layers", "2", "--device-lookup", "on", "--max-new-tokens", "6", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["in_place_per_token"] > 0  # three slots of eight per cached layer


def test_cli_bad_device_lookup(deep_dir):
    result = CliRunner().invoke(app, ["generate", str(deep_dir), "-p", "Hello", "--device", "cpu", "--quantize", "4/2",
                                      "--cpu-layers", "1", "--device-lookup", "sometimes", "--max-new-tokens", "2"])
    assert result.exit_code != 0
    assert "--device-lookup 'sometimes' is not one of off, auto, on" in result.output
    assert "Traceback" not in result.output


# -- CUDA: the lookups run inside CUDA graphs, misses are read over PCIe from pinned memory ----------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("cpu_layers", [1, 2])
def test_cuda_device_lookup_bit_identical(deep_dir, cpu_layers):
    # CPU layers compute all their experts: what they would copy instead depends on timing (cpu_layer_share)
    off = load(deep_dir, cpu_layers=cpu_layers, device="cuda", dtype="bfloat16", device_lookup="off",
               cpu_layer_copies=False)
    expected = decode(off, 24)
    on = load(deep_dir, cpu_layers=cpu_layers, device="cuda", dtype="bfloat16", device_lookup="on",
              cpu_layer_copies=False)
    assert on.expert_cache.store.pinned and on.expert_cache.table is not None
    got = decode(on, 24)
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])
    s = on.cache_stats.total()
    assert s.in_place > 0 and s.hits > 0
    assert table_matches_cache(on.expert_cache)
    # a second request after a prefill that moved experts around: still the same
    again = decode(on, 24)
    assert again[0] == expected[0] and torch.equal(again[1], expected[1])


@cuda
def test_cuda_device_lookup_auto_and_graph_segments(deep_dir):
    engine = load(deep_dir, slots_per_cached_layer=7, cpu_layers=2, device="cuda", dtype="bfloat16")
    assert engine.expert_cache.table is not None  # 7 of 8 experts kept: auto turns it on
    assert load(deep_dir, cpu_layers=2, device="cuda", dtype="bfloat16").expert_cache.table is None  # 3 of 8: off
    from moe_offload.graphs import GraphedDecode

    session = engine.new_session()
    session.prefill([3, 4, 5])
    decoder = GraphedDecode(engine.model, session.kv)
    assert decoder.host_layers == [0, 2]  # the model's layers 0 and 2: the CPU layers; 1 and 3 in the graphs
    assert len(decoder.segments) == 3


def test_auto_needs_the_cached_layers_to_keep_most_experts():
    from moe_offload.offload.planner import Plan
    from moe_offload.placement import wants_device_lookup

    def plan(total_slots, cpu_layers):
        return Plan(budget_bytes=1, policy="lru", num_layers=32, num_experts=8, expert_bytes=1, slots_per_layer=1,
                    total_slots=total_slots, non_expert_bytes=0, kv_cache_bytes=0, workspace_bytes=0,
                    cpu_layers=cpu_layers)

    auto, gpu = OffloadOptions(device_lookup="auto"), torch.device("cuda")
    assert wants_device_lookup(auto, plan(139, 12), gpu)  # 6.95 of 8 experts per cached layer
    assert not wants_device_lookup(auto, plan(139, 9), gpu)  # 6.04 of 8: misses read in place cost more
    assert not wants_device_lookup(auto, plan(139, 0), gpu)  # no CPU layer, no point of contact
    assert not wants_device_lookup(auto, plan(139, 12), torch.device("cpu"))
    assert wants_device_lookup(OffloadOptions(device_lookup="on"), plan(10, 2), torch.device("cpu"))
    assert not wants_device_lookup(OffloadOptions(device_lookup="off"), plan(139, 12), gpu)


def test_decode_segments_end_at_host_layers(deep_dir, monkeypatch):
    """graphs.GraphedDecode run eagerly on the CPU: a segment runs the device-lookup layers whole and stops at a CPU
    layer's router; the step equals the ordinary decode path."""
    from moe_offload.graphs import GraphedDecode

    engine = load(deep_dir, device_lookup="on")
    for block in engine.model.moe_blocks():  # on a CPU device no layer decodes on the device: pretend they do
        if block.experts.device_lookup:
            monkeypatch.setattr(block.experts, "decode_on_device", lambda x: x.shape[0] == 1)
    dynamic, static = engine.new_session(), engine.new_session()
    prompt = list(range(3, 30))
    logits = dynamic.prefill(prompt)[0]
    static.prefill(prompt)
    decoder = GraphedDecode(engine.model, static.kv, use_graphs=False)
    assert decoder.host_layers == [0, 2] and decoder.segments == [(0, 0), (1, 2), (3, None)]
    calls = []
    cpu_layer = engine.model.moe_blocks()[0].experts
    original = cpu_layer.decode_prologue
    monkeypatch.setattr(cpu_layer, "decode_prologue", lambda *a: calls.append(1) or original(*a))
    token = int(logits.argmax())
    for step in range(8):
        a = dynamic.step(token)
        before = len(calls)
        b = decoder.step(token, len(static.tokens))
        assert len(calls) == before + 1  # the segment's, handed over: not computed again by the layer
        assert set(decoder.prologues) == {0, 1}  # each CPU layer's sync is prepared at the end of its segment
        static.tokens.append(token)
        static.kv.length = len(static.tokens)
        assert (a - b).abs().max().item() < 1e-4
        token = int(a.argmax())
