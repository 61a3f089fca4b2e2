"""The same exactness on a CUDA GPU: copies on a side stream, events, pinned memory (skipped without CUDA)."""

import pytest
import torch

import moe_offload
from moe_offload.engine import load_synthetic
from moe_offload.placement import OffloadOptions

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def greedy(engine, prompt, n=24):
    session = engine.new_session()
    logits, _ = session.prefill(prompt)
    first = logits.clone()
    out = []
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        logits = session.step(token)
    return first, out


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("options", [
    OffloadOptions(offload_per_layer=3, prefetch=0), OffloadOptions(offload_per_layer=2, prefetch=1),
    OffloadOptions(offload_per_layer=1, prefetch=2, policy="global-lru"),
    OffloadOptions(cache=False, force=True),
], ids=["one-slot", "lru-pf1", "global-pf2", "no-cache"])
def test_cuda_offloaded_bit_identical(tiny_dir, dtype, options):
    prompt = list(range(3, 40))
    resident = moe_offload.load(tiny_dir, device="cuda", dtype=dtype)
    offloaded = moe_offload.load(tiny_dir, device="cuda", dtype=dtype, offload=options)
    assert offloaded.expert_cache.store.pinned
    a, b = greedy(resident, prompt), greedy(offloaded, prompt)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


@pytest.mark.parametrize("preset", ["4/2", "4/3"])
def test_cuda_synthetic_quantized_offload_bit_identical(preset):
    prompt = list(range(3, 60))
    resident = load_synthetic("tiny", preset=preset, device="cuda")
    offloaded = load_synthetic("tiny", preset=preset, device="cuda", offload=OffloadOptions(offload_per_layer=2))
    a, b = greedy(resident, prompt), greedy(offloaded, prompt)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert offloaded.cache_stats.summary()["bytes_copied"] > 0
