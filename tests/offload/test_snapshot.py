"""The expert-state snapshot behind the server's live expert view, checked against the slots' bytes."""

import threading

import pytest
import torch

import moe_offload
from moe_offload.offload.snapshot import LEGEND, resident_snapshot, snapshot
from moe_offload.placement import OffloadOptions


@pytest.fixture
def engine(tiny_dir):
    e = moe_offload.load(tiny_dir, device="cpu", dtype="float32",
                         offload=OffloadOptions(offload_per_layer=2, prefetch=1))
    e.generate("Mixture of experts route tokens", max_new_tokens=12, ignore_eos=True)
    return e


def keys_in(snap, states: str) -> set[tuple[int, int]]:
    return {(layer, e) for layer, row in zip(snap.layers, snap.grid) for e, s in enumerate(row) if s in states}


def test_states_match_what_the_slots_hold(engine):
    cache = engine.expert_cache
    snap = snapshot(cache)
    assert snap.layers == (0, 1) and snap.num_experts == 4 and all(len(row) == 4 for row in snap.grid)
    on_gpu = keys_in(snap, "gf")
    assert len(on_gpu) == cache.num_slots == 4  # 2 slots a layer, all filled by now
    for key in on_gpu:  # independent check: the slot really holds that expert's bytes
        assert torch.equal(cache.slots[cache.policy.slot_of(key)], cache.store.buffer(key)), key
    assert keys_in(snap, "f") == cache.prefetched
    assert keys_in(snap, "h") == set(cache.store.keys()) - on_gpu
    assert snap.counts() == {"g": 4 - len(cache.prefetched), "f": len(cache.prefetched), "c": 0, "h": 4, "p": 0}


class Event:
    def __init__(self, done: bool):
        self.done = done

    def query(self) -> bool:
        return self.done


def test_copy_in_flight_and_cpu_states(engine):
    cache = engine.expert_cache
    resident = sorted(cache.policy.resident())
    copying, copied = resident[0], resident[1]
    cache.ready[cache.policy.slot_of(copying)] = Event(done=False)  # the copy stream has not passed it yet
    cache.ready[cache.policy.slot_of(copied)] = Event(done=True)
    host = sorted(set(cache.store.keys()) - set(resident))
    cache.cpu_recent = {host[0], resident[2]}  # what the hybrid path will publish
    snap = snapshot(cache)
    assert snap.state(*copying) == "c" and snap.state(*copied) in "gf"
    assert snap.state(*host[0]) == "p" and snap.state(*resident[2]) in "gf"  # on the GPU wins
    assert snap.state(*host[1]) == "h"
    cache.cpu_recent = lambda: [list(host[1])]  # a callable returning keys is read too
    assert snapshot(cache).state(*host[1]) == "p"
    cache.cpu_recent = 7  # not a collection of keys: no CPU state, no failure
    assert keys_in(snapshot(cache), "p") == set()


def test_reads_are_retried_while_the_worker_mutates(engine, monkeypatch):
    cache = engine.expert_cache
    real, calls = cache.policy.resident, []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("Set changed size during iteration")
        return real()

    monkeypatch.setattr(cache.policy, "resident", flaky)
    assert keys_in(snapshot(cache), "gf") == real() and len(calls) == 3

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(cache.policy, "resident", broken)
    with pytest.raises(RuntimeError, match="illegal memory"):  # other errors are not swallowed
        snapshot(cache)

    def always():
        raise RuntimeError("OrderedDict mutated during iteration")

    monkeypatch.setattr(cache.policy, "resident", always)
    with pytest.raises(RuntimeError, match="mutated"):
        snapshot(cache)


def test_snapshots_while_a_thread_decodes(engine):
    """The server reads from its event loop while the worker decodes: no failure, never more than the slots."""
    cache, errors = engine.expert_cache, []
    done = threading.Event()

    def decode():
        try:
            engine.generate("Offloading keeps experts", max_new_tokens=40, ignore_eos=True)
        except Exception as e:  # reported below, on the main thread
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=decode).start()
    seen = 0
    while not done.is_set() or seen == 0:
        snap = snapshot(cache)
        assert len(keys_in(snap, "gf")) <= cache.num_slots
        seen += 1
    assert not errors and seen > 1


def test_resident_snapshot():
    snap = resident_snapshot([1, 3], 8)
    assert snap.layers == (1, 3) and snap.grid == ("g" * 8, "g" * 8) and snap.state(3, 7) == "g"
    assert snap.counts() == {"g": 16, "f": 0, "c": 0, "h": 0, "p": 0} and set(LEGEND) == set(snap.counts())
