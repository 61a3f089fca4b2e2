"""The static-shape decode step (what the CUDA graphs capture) against the ordinary decode path."""

import pytest
import torch

import moe_offload
from conftest import make_checkpoint
from moe_offload.graphs import GraphedDecode


def compare(engine, prompt, steps=12, use_graphs=False):
    dynamic, static = engine.new_session(), engine.new_session()
    logits, _ = dynamic.prefill(prompt)
    static.prefill(prompt)
    decoder = GraphedDecode(engine.model, static.kv, use_graphs=use_graphs)
    token = int(logits.argmax())
    worst = 0.0
    for _ in range(steps):
        a = dynamic.step(token)
        b = decoder.step(token, len(static.tokens))
        static.tokens.append(token)
        static.kv.length = len(static.tokens)
        worst = max(worst, (a - b).abs().max().item())
        token = int(a.argmax())
    return worst


def test_static_decode_matches_dynamic(tiny_engine):
    assert compare(tiny_engine, list(range(3, 25))) < 1e-4


def test_static_decode_sliding_window(tmp_path):
    engine = moe_offload.load(make_checkpoint(tmp_path / "m", sliding_window=5), device="cpu", dtype="float32",
                              max_context=64)
    assert compare(engine, list(range(3, 12)), steps=10) < 1e-4


def graphed_logits(engine, prompt, use_graphs, steps):
    """Logits of ``steps`` greedy decode steps through GraphedDecode, stacked."""
    session = engine.new_session()
    logits, _ = session.prefill(prompt)
    decoder = GraphedDecode(engine.model, session.kv, use_graphs=use_graphs)
    token, seq = int(logits.argmax()), []
    for _ in range(steps):
        logits = decoder.step(token, len(session.tokens))
        session.tokens.append(token)
        session.kv.length = len(session.tokens)
        token = int(logits.argmax())
        seq.append(logits)
    return torch.stack(seq)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replay_equals_eager_static(tiny_dir):
    engine = moe_offload.load(tiny_dir, device="cuda", dtype="bfloat16", cuda_graphs=False)
    prompt = list(range(3, 30))
    outs = [graphed_logits(engine, prompt, use_graphs, 16) for use_graphs in (False, True)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("offloaded", [False, True])
def test_cuda_expert_graphs_equal_eager_experts(offloaded):
    """Quantized experts replay per-input graphs inside a graphed step: same kernels, same bits."""
    from moe_offload.engine import load_synthetic
    from moe_offload.placement import OffloadOptions

    offload = OffloadOptions(offload_per_layer=2, hybrid="off") if offloaded else None
    prompt = list(range(3, 40))
    # 24 steps: long enough for every expert to be warmed, captured and replayed
    outs = [graphed_logits(load_synthetic("tiny", preset="4/2", device="cuda", offload=offload, cuda_graphs=False),
                           prompt, use_graphs, 24) for use_graphs in (False, True)]
    assert torch.equal(outs[0], outs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("window", [None, 7])
def test_cuda_decode_attention_kernel_matches_dynamic_sdpa(tmp_path, window):
    """The static step's Triton decode attention (keys <= pos only) against the dynamic path's SDPA."""
    from moe_offload.kernels.attention import decode_attention_ok

    engine = moe_offload.load(make_checkpoint(tmp_path / "m", sliding_window=window), device="cuda",
                              dtype="bfloat16", max_context=128, cuda_graphs=False)
    c = engine.config
    probe_q = torch.empty(1, c.num_heads, 1, c.head_dim, device="cuda", dtype=torch.bfloat16)
    probe_k = torch.empty(1, c.num_kv_heads, 128, c.head_dim, device="cuda", dtype=torch.bfloat16)
    assert decode_attention_ok(probe_q, probe_k), "the kernel must be the one under test"
    assert compare(engine, list(range(3, 30)), steps=16, use_graphs=True) < 0.1
