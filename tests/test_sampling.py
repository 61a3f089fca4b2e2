"""Sampling filters against naive float64 references."""

import pytest
import torch

from moe_offload import MoeOffloadError, SamplingParams
from moe_offload.sampling import filter_top_k, filter_top_p, sample


def naive_top_p(logits: torch.Tensor, p: float) -> set[int]:
    probs = torch.softmax(logits.double(), -1)
    order = sorted(range(len(probs)), key=lambda i: -probs[i].item())
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i].item()
        if mass >= p:
            break
    return kept


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_smallest_set_reaching_mass(p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(int(p * 100)))
    filtered = filter_top_p(logits, p)
    for row in range(4):
        kept = set(torch.nonzero(filtered[row] > float("-inf")).flatten().tolist())
        assert kept == naive_top_p(logits[row], p)


def test_top_k_keeps_k_largest():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    filtered = filter_top_k(logits, 5)
    for row in range(3):
        kept = set(torch.nonzero(filtered[row] > float("-inf")).flatten().tolist())
        assert kept == set(torch.topk(logits[row], 5).indices.tolist())


def test_sampling_distribution_follows_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    params = SamplingParams(temperature=0.5)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, params, g) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=3).double() / len(draws)
    expected = torch.softmax(logits[0].double() / 0.5, -1)
    assert torch.allclose(freq, expected, atol=0.03)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2},
                                    {"max_new_tokens": 0}, {"stop": ("",)}])
def test_invalid_params_rejected(kwargs):
    with pytest.raises(MoeOffloadError):
        SamplingParams(**kwargs)
