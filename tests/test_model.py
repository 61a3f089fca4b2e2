"""Our model code against transformers' Mixtral on the same checkpoints."""

import pytest
import torch

import moe_offload
from conftest import hf_model, make_checkpoint
from moe_offload.model import attention_mask

ATOL = 2e-5


def ours_logits(engine, ids, chunks=None):
    """Logits for ids, fed in the given chunk sizes (exercising the KV cache)."""
    kv = engine.model.new_kv_cache(128)
    chunks = chunks or [len(ids)]
    out, start = [], 0
    for n in chunks:
        t = torch.tensor([ids[start : start + n]])
        out.append(engine.model(t, kv, start))
        start += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("length", [1, 5, 17, 40])
def test_logits_match_transformers(tiny_dir, tiny_engine, length):
    ids = torch.randint(3, 320, (length,), generator=torch.Generator().manual_seed(length)).tolist()
    with torch.no_grad():
        ref = hf_model(tiny_dir)(torch.tensor([ids])).logits
    ours = ours_logits(tiny_engine, ids)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4)


def test_decode_steps_with_kv_cache_match_full_forward(tiny_dir, tiny_engine):
    ids = torch.randint(3, 320, (24,), generator=torch.Generator().manual_seed(7)).tolist()
    with torch.no_grad():
        ref = hf_model(tiny_dir)(torch.tensor([ids])).logits
    # prefill 10, then 14 single-token decode steps
    ours = ours_logits(tiny_engine, ids, [10] + [1] * 14)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("overrides", [
    {"sliding_window": 6},
    {"tie_word_embeddings": True},
    {"rope_theta": 10000.0, "num_key_value_heads": 4, "num_experts_per_tok": 1},
], ids=["sliding-window", "tied-embeddings", "mha-top1-theta"])
def test_architecture_variants_match_transformers(tmp_path, overrides):
    directory = make_checkpoint(tmp_path / "m", seed=3, **overrides)
    engine = moe_offload.load(directory, device="cpu", dtype="float32")
    ids = torch.randint(3, 320, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ref = hf_model(directory)(torch.tensor([ids])).logits
    torch.testing.assert_close(ours_logits(engine, ids, [12] + [1] * 8), ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_matches_transformers(tiny_dir, dtype):
    from transformers import MixtralForCausalLM

    torch_dtype = getattr(torch, dtype)
    engine = moe_offload.load(tiny_dir, device="cpu", dtype=dtype)
    assert engine.model.lm_head.weight.dtype == torch_dtype
    ids = list(range(3, 30))
    with torch.no_grad():
        ref = MixtralForCausalLM.from_pretrained(str(tiny_dir), dtype=torch_dtype).eval()(torch.tensor([ids])).logits
    ours = ours_logits(engine, ids, [20] + [1] * 7)
    # Same model in the same precision: rounding differs slightly, nothing more.
    assert (ours - ref.float()).abs().mean() < 0.04 * ref.float().abs().mean()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_attention_mask_sliding_window():
    mask = attention_mask(start=3, new=2, window=2, device=torch.device("cpu"))
    assert mask.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]
    assert attention_mask(start=5, new=1, window=None, device=torch.device("cpu")) is None


def test_experts_provider_is_swappable(tiny_engine):
    """The MoE block calls whatever provider it holds: a naive per-token loop gives the same output."""
    block = tiny_engine.model.layers[0].moe
    resident = block.experts
    calls = []

    def naive(x, indices, weights):
        calls.append(indices.shape)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for k in range(indices.shape[1]):
                out[t] += weights[t, k] * resident.experts[int(indices[t, k])](x[t : t + 1])[0]
        return out

    x = torch.randn(1, 6, 64)
    expected = block(x)
    block.set_experts(naive)
    try:
        got = block(x)
    finally:
        block.set_experts(resident)
    assert calls == [(6, 2)]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prefill_sums_each_tokens_experts_in_float32_rank_order():
    """combine_experts' prefill: each (token, rank) pair's expert output lands in its own row, then one float32 sum per
    token in rank order (model.sum_ranks): against float64, one rounding at the end."""
    from moe_offload.model import combine_experts, sum_ranks

    class Scale(torch.nn.Module):  # row-wise, so a row's output never depends on the batch it came in
        def __init__(self, c):
            super().__init__()
            self.c = torch.randn(d, generator=g).to(torch.bfloat16) * c

        def forward(self, x):
            return x * self.c

    g = torch.Generator().manual_seed(0)
    t, k, d, e = 9, 2, 16, 4
    experts = [Scale(j + 1) for j in range(e)]
    x = torch.randn(t, d, generator=g).to(torch.bfloat16)
    indices = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.rand(t, k, generator=g)
    got = combine_experts(x, indices, weights, experts.__getitem__)
    rows = torch.stack([experts[int(indices[i, j])](x[i : i + 1])[0] for i in range(t) for j in range(k)])
    exact = (rows.double().reshape(t, k, d) * weights.double()[:, :, None]).sum(1)
    assert torch.allclose(got.double(), exact, rtol=2**-7, atol=1e-6)
    assert torch.equal(got, sum_ranks(rows, weights))
    assert torch.equal(sum_ranks(rows[:k], weights[0]), got[:1])  # [K] weights: one token
