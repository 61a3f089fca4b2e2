"""engine.py's GPU-side assembly, checked on the CPU: the q/k/v projections stacked into one matmul."""

import pytest
import torch

from moe_offload.config import ModelConfig
from moe_offload.engine import _fused_qkv, load_synthetic
from moe_offload.model import Attention
from moe_offload.quant.hqq import QuantSpec
from moe_offload.quant.linear import QuantLinear
from moe_offload.synthetic import SHAPES


def projections(attn, x):
    return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)


@pytest.mark.parametrize("preset", [None, "4/2"])
def test_stacked_qkv_equals_the_three_projections(preset):
    engine = load_synthetic("tiny", preset=preset, device="cpu", dtype="float32")
    attn = engine.model.layers[0].self_attn
    x = torch.randn(1, 3, attn.q_proj.in_features)
    before = [t.clone() for t in projections(attn, x)]
    params = sum(t.numel() for t in list(attn.parameters()) + list(attn.buffers()))
    fused = _fused_qkv(attn)
    assert fused is not None
    q, k, v = fused(x).split([t.shape[-1] for t in before], dim=-1)
    for got, want in zip((q, k, v), before):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    # The modules now read row views of the stacked weights: same outputs, nothing stored twice.
    for got, want in zip(projections(attn, x), before):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert sum(t.numel() for t in list(attn.parameters()) + list(attn.buffers())) == params
    first = attn.q_proj.qweight if preset else attn.q_proj.weight
    last = attn.v_proj.qweight if preset else attn.v_proj.weight
    assert first.untyped_storage().data_ptr() == last.untyped_storage().data_ptr()


def test_stacked_qkv_with_biases_in_the_model():
    config = ModelConfig(**{**SHAPES["tiny"], "qkv_bias": True})
    attn = Attention(config)
    for p in (attn.q_proj, attn.k_proj, attn.v_proj):
        torch.nn.init.normal_(p.bias)
    x = torch.randn(1, 2, config.hidden_size)
    want = projections(attn, x)
    q, k, v = _fused_qkv(attn)(x).split([t.shape[-1] for t in want], dim=-1)
    for got, w in zip((q, k, v), want):
        assert torch.allclose(got, w, rtol=1e-5, atol=1e-6)


def test_unlike_projections_stay_apart():
    config = ModelConfig(**SHAPES["tiny"])
    attn = Attention(config)
    attn.q_proj = QuantLinear.from_linear(attn.q_proj, QuantSpec(4, 64))
    attn.k_proj = QuantLinear.from_linear(attn.k_proj, QuantSpec(2, 16))
    attn.v_proj = QuantLinear.from_linear(attn.v_proj, QuantSpec(4, 64))
    assert _fused_qkv(attn) is None


def test_model_with_stacked_qkv_generates_the_same():
    plain = load_synthetic("tiny-qwen3", preset="4/2", device="cpu", dtype="float32")
    stacked = load_synthetic("tiny-qwen3", preset="4/2", device="cpu", dtype="float32")
    for layer in stacked.model.layers:
        layer.self_attn.fused_qkv = _fused_qkv(layer.self_attn)
        assert layer.self_attn.fused_qkv is not None
    prompt = list(range(3, 20))
    a, b = plain.new_session(), stacked.new_session()
    la, lb = a.prefill(prompt)[0], b.prefill(prompt)[0]
    assert torch.allclose(la, lb, rtol=1e-4, atol=1e-5)
    for _ in range(4):
        token = int(la.argmax())
        assert token == int(lb.argmax())
        la, lb = a.step(token), b.step(token)
