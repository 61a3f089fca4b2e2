"""engine.py's GPU-side assembly, checked on the CPU: the q/k/v projections stacked into one matmul, int8 activations."""

import pytest
import torch
import torch.nn.functional as F

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


@pytest.mark.parametrize("preset, rounded", [("4/2", True), ("4/3", True), ("4/4", True), ("8/8", False)])
def test_int8_activations_reach_the_2_3_and_4_bit_experts(preset, rounded):
    """The option marks exactly the 2/3/4-bit experts; they then compute on int8-rounded inputs (the GEMV's
    arithmetic, checked against the kernel in tests/kernels/test_gemv_int8.py), about 1% off the exact model."""
    from moe_offload.kernels.gemv_int8 import fake_quantize_reference
    from moe_offload.weights import QuantExpert

    exact = load_synthetic("tiny", preset=preset, device="cpu", dtype="float32")
    int8 = load_synthetic("tiny", preset=preset, device="cpu", dtype="float32", int8_activations=True)
    experts = [m for m in int8.model.modules() if isinstance(m, QuantExpert)]
    assert experts and all(m.int8_activations == rounded for m in experts)
    assert not any(m.int8_activations for m in exact.model.modules() if isinstance(m, QuantExpert))
    e = experts[0]
    x = torch.randn(1, e.gate_proj.in_features, generator=torch.Generator().manual_seed(0))  # a decode step's token
    h = F.silu(e.gate_proj(fake_quantize_reference(x))) * e.up_proj(fake_quantize_reference(x))
    want = e.down_proj(fake_quantize_reference(h)) if rounded else e.down_proj(F.silu(e.gate_proj(x)) * e.up_proj(x))
    assert torch.equal(e(x), want)
    xs = x.repeat(3, 1)  # prefill-sized: exact either way
    assert torch.equal(e(xs), e.down_proj(F.silu(e.gate_proj(xs)) * e.up_proj(xs)))
    prompt = list(range(3, 20))
    a, b = exact.new_session(), int8.new_session()
    la, lb = a.prefill(prompt)[0], b.prefill(prompt)[0]
    assert torch.equal(la, lb)
    token = int(la.argmax())
    la, lb = a.step(token), b.step(token)
    rel = ((la - lb).norm() / la.norm()).item()
    assert (0 < rel < 0.05) if rounded else rel == 0


def test_int8_activations_offloaded_equal_resident():
    """Offloading still changes nothing: the cache's slot experts round their inputs like the resident ones."""
    from moe_offload.placement import OffloadOptions

    resident = load_synthetic("tiny", preset="4/2", device="cpu", dtype="float32", int8_activations=True)
    offloaded = load_synthetic("tiny", preset="4/2", device="cpu", dtype="float32", int8_activations=True,
                               offload=OffloadOptions(offload_per_layer=2, hybrid="off"))
    assert offloaded.expert_cache is not None
    prompt = list(range(3, 20))
    a, b = resident.new_session(), offloaded.new_session()
    la, lb = a.prefill(prompt)[0], b.prefill(prompt)[0]
    assert torch.equal(la, lb)
    for _ in range(4):
        token = int(la.argmax())
        la, lb = a.step(token), b.step(token)
        assert torch.equal(la, lb)
