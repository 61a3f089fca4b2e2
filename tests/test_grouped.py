"""Stacked experts and the slot batch API on the CPU (the grouped kernels themselves: tests/kernels/test_grouped.py)."""

from __future__ import annotations

import pytest
import torch

from moe_offload.config import ModelConfig
from moe_offload.errors import MoeOffloadError
from moe_offload.flat import FlatLayout
from moe_offload.grouped import StackedExperts, grouped_ok
from moe_offload.model import ResidentExperts
from moe_offload.offload.cache import ExpertCache
from moe_offload.offload.policy import PerLayerLRU
from moe_offload.offload.stats import CacheStats
from moe_offload.offload.store import ExpertStore
from moe_offload.quant.hqq import QuantSpec, quantize
from moe_offload.weights import build_expert

CONFIG = ModelConfig("mixtral", vocab_size=16, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=4,
                     num_kv_heads=2, head_dim=16, num_experts=4, top_k=2)
SPEC = QuantSpec(4, 32)


def expert_flats(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    flats = []
    for _ in range(CONFIG.num_experts):
        flat = {}
        for proj, shape in (("gate_proj", (96, 64)), ("up_proj", (96, 64)), ("down_proj", (64, 96))):
            flat.update({f"{proj}.{k}": v for k, v in quantize(torch.randn(shape, generator=g), SPEC).tensors().items()})
        flats.append(flat)
    return flats


def test_stacked_experts_compute_like_resident_experts_on_cpu():
    flats = expert_flats()
    stacked = StackedExperts(FlatLayout.of(flats[0]), CONFIG, SPEC, torch.device("cpu"))
    resident = ResidentExperts(4, 64, 96)
    for e, flat in enumerate(flats):
        stacked.put(e, flat)
        resident.experts[e] = build_expert(flat, CONFIG, SPEC)
    assert stacked.filled == {0, 1, 2, 3}
    x = torch.randn(5, 64)
    weights, indices = torch.softmax(torch.randn(5, 4), -1).topk(2, dim=-1)
    assert torch.equal(stacked(x, indices, weights), resident(x, indices, weights))
    assert torch.equal(stacked(x[:1], indices[:1], weights[:1]), resident(x[:1], indices[:1], weights[:1]))
    assert not stacked.decode_on_device(x[:1])  # the grouped kernels are for CUDA 16-bit decode only
    assert not grouped_ok(x[:1], stacked.experts[0])


def test_stacked_experts_reject_foreign_tensors():
    flats = expert_flats()
    stacked = StackedExperts(FlatLayout.of(flats[0]), CONFIG, SPEC, torch.device("cpu"))
    with pytest.raises(MoeOffloadError, match="expert 1 has tensors"):
        stacked.put(1, {"gate_proj.qweight": flats[0]["gate_proj.qweight"]})


def test_slots_for_batches_waits_and_falls_back_when_scratch_runs_out():
    flats = expert_flats()
    layout = FlatLayout.of(flats[0])
    store = ExpertStore(layout, [(0, e) for e in range(4)], pin=False)
    for e, flat in enumerate(flats):
        store.put((0, e), flat)
    stats = CacheStats.for_layers(1)
    cache = ExpertCache(store, PerLayerLRU(1, 1), torch.device("cpu"),
                        lambda views: build_expert(views, CONFIG, SPEC), stats, scratch_slots=1)
    cache.load(0, [2, 3])  # one slot: 2 gets it, then 3 evicts... both protected, so 3 gets no slot
    slots = cache.slots_for(0, [2])
    assert slots is not None and len(slots) == 1
    assert torch.equal(cache.slots[slots[0]], store.buffer((0, 2)))
    # Two experts without a slot but one scratch slot: the caller must go expert by expert.
    assert cache.slots_for(0, [0, 1]) is None
    one = cache.slots_for(0, [2, 1])  # 2 in its slot, 1 through the scratch slot
    assert one is not None and one[0] != one[1]
    assert torch.equal(cache.slots[one[1]], store.buffer((0, 1)))
