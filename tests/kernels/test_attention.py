"""Decode attention kernel against float32 SDPA under the same mask (GPU only)."""

from __future__ import annotations

import pytest
import torch

from moe_offload import kernels

gpu = pytest.mark.skipif(not kernels.available(), reason="needs Triton and a CUDA GPU")


def inputs(h: int, hk: int, m: int, dh: int, seed: int = 0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, h, 1, dh, device="cuda", generator=g).to(dtype)
    k = torch.randn(1, hk, m, dh, device="cuda", generator=g).to(dtype)
    v = torch.randn(1, hk, m, dh, device="cuda", generator=g).to(dtype)
    return q, k, v


@gpu
@pytest.mark.parametrize("h,hk", [(32, 8), (32, 4), (16, 16)], ids=["mixtral", "qwen3", "mha"])
@pytest.mark.parametrize("m,pos", [(64, 0), (64, 63), (640, 1), (640, 333), (4096, 4095), (4096, 700)])
@pytest.mark.parametrize("window", [None, 5, 300])
def test_decode_attention_matches_sdpa(h, hk, m, pos, window):
    from moe_offload.kernels.attention import decode_attention, decode_attention_reference

    q, k, v = inputs(h, hk, m, 128)
    p = torch.tensor([pos], device="cuda")
    y = decode_attention(q, k, v, p, window)
    ref = decode_attention_reference(q, k, v, p, window)
    assert y.shape == (1, h, 1, 128) and torch.isfinite(y).all()
    err = (y.float() - ref.float()).abs().max().item()
    assert err < 2e-2, f"max error {err}"
    # Keys past pos must not matter: poison them.
    k[:, :, pos + 1 :], v[:, :, pos + 1 :] = float("nan"), float("nan")
    assert torch.equal(decode_attention(q, k, v, p, window), y)


@gpu
def test_decode_attention_head_dim_64_and_float16():
    from moe_offload.kernels.attention import decode_attention, decode_attention_reference

    q, k, v = inputs(8, 2, 300, 64, dtype=torch.float16)
    p = torch.tensor([250], device="cuda")
    err = (decode_attention(q, k, v, p).float() - decode_attention_reference(q, k, v, p).float()).abs().max().item()
    assert err < 1e-2


@gpu
def test_decode_attention_in_cuda_graph_reads_pos_at_replay():
    from moe_offload.kernels.attention import decode_attention, decode_attention_reference

    q, k, v = inputs(32, 8, 512, 128)
    p = torch.tensor([10], device="cuda")
    decode_attention(q, k, v, p)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = decode_attention(q, k, v, p)
    for pos in (3, 200, 511):
        p.fill_(pos)
        graph.replay()
        ref = decode_attention_reference(q, k, v, p)
        assert (y.float() - ref.float()).abs().max().item() < 2e-2
