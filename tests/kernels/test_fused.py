"""The fused decode-step kernels (kernels/fused.py) against their PyTorch references.

On a CUDA GPU they run there. Without one, when Triton is installed, the same tests run on the CPU under
Triton's interpreter (a subprocess with TRITON_INTERPRET=1), so CI checks the kernels' arithmetic too.
"""

import importlib.util
import os

import pytest
import torch

from kernel_helpers import run_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if INTERPRETED else None
on_device = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU or Triton's interpreter")
# The interpreter converts to bfloat16 by truncation, not rounding: bfloat16 is checked on the GPU only.
HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@pytest.mark.skipif(DEVICE is not None or importlib.util.find_spec("triton") is None,
                    reason="runs the tests below under Triton's interpreter when there is no GPU")
def test_fused_kernels_under_the_triton_interpreter():
    run_under_interpreter(__file__)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@on_device
@pytest.mark.parametrize("dtype", [HALF, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 96), (1, 1, 4, 128)])  # a token, rows, Qwen3's per-head q/k norm
def test_rms_norm(dtype, shape):
    from moe_offload.kernels.fused import rms_norm, rms_norm_reference

    x = (torch.randn(shape, generator=gen()) * 3).to(DEVICE, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen(1))).to(DEVICE, dtype)
    got = rms_norm(x, w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    exact = rms_norm_reference(x.double(), w.double(), 1e-5)  # float64, no intermediate rounding
    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -23}[dtype]
    assert torch.allclose(got.double(), exact, rtol=2 * ulp, atol=0)  # two roundings, as in the model's code
    ref = rms_norm_reference(x, w, 1e-5)  # PyTorch's own: the same two roundings, the mean added in another order
    assert torch.allclose(got.double(), ref.double(), rtol=2 * ulp if dtype != torch.float32 else 1e-6, atol=0)
    if dtype != torch.float32:  # rounding to 8-11 bits absorbs the mean's last-bit difference nearly always
        assert (got == ref).float().mean() > 0.95


@on_device
def test_rms_norm_declines_what_it_does_not_handle():
    from moe_offload.kernels.fused import rms_norm

    x = torch.randn(4, 8, device=DEVICE).t()  # not contiguous
    assert rms_norm(x, torch.ones(4, device=DEVICE), 1e-5) is None
    assert rms_norm(torch.randn(2, 8), torch.ones(8), 1e-5) is None or INTERPRETED  # CPU tensors: PyTorch's code


@on_device
@pytest.mark.parametrize("dtype", [HALF, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, dh", [(32, 8, 128), (4, 2, 16), (16, 16, 64)])
def test_rope_matches_eager(dtype, heads, kv_heads, dh):
    from moe_offload.kernels.fused import rope, rope_reference
    from moe_offload.model import rope_cos_sin

    # As the model makes them: q/k projections viewed [B, S, H, Dh] and transposed (strided views).
    q = torch.randn(1, 1, heads * dh, generator=gen()).to(DEVICE, dtype).view(1, 1, heads, dh).transpose(1, 2)
    k = torch.randn(1, 1, kv_heads * dh, generator=gen(1)).to(DEVICE, dtype).view(1, 1, kv_heads, dh).transpose(1, 2)
    cos, sin = rope_cos_sin(torch.tensor([[1234]], device=DEVICE), dh, 1e6, dtype)
    got_q, got_k = rope(q, k, cos, sin)
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    for x, got in ((q, got_q), (k, got_k)):
        half = dh // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1).double()
        p1, p2 = x.double() * cos.double(), rotated * sin.double()
        # Three roundings (two products, the sum), each within half a unit in the last place.
        bound = ulp * (p1.abs() + p2.abs()) + 1e-30
        assert ((got.double() - (p1 + p2)).abs() <= bound).all()
        assert ((rope_reference(x, cos, sin).double() - (p1 + p2)).abs() <= bound).all()  # the bound holds for eager


@on_device
@pytest.mark.parametrize("experts, k, normalize", [(8, 2, True), (8, 2, False), (128, 8, True), (60, 4, False)])
def test_route_matches_softmax_topk(experts, k, normalize):
    from moe_offload.kernels.fused import route, route_reference

    logits = (torch.randn(5, experts, generator=gen()) * 2).to(DEVICE)  # float32: no ties (bfloat16 may tie)
    w, i = route(logits, k, normalize)
    rw, ri = route_reference(logits, k, normalize)
    assert w.dtype == torch.float32 and i.dtype == torch.int64 and w.shape == (5, k)
    assert torch.equal(i, ri)
    assert torch.allclose(w, rw, rtol=1e-5, atol=1e-6)


@on_device
def test_route_breaks_ties_toward_the_lower_expert():
    from moe_offload.kernels.fused import route

    logits = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0, -1.0, 0.0, 0.0]], device=DEVICE)
    w, i = route(logits, 2, False)
    assert i.tolist() == [[1, 2]] and w[0, 0] == w[0, 1]


@on_device
@pytest.mark.parametrize("k, d", [(2, 4096), (8, 2048), (4, 1000)])
def test_weighted_sum(k, d):
    from moe_offload.kernels.fused import weighted_sum, weighted_sum_reference

    y = torch.randn(k, d, generator=gen()).to(DEVICE, HALF)
    w = torch.rand(k, generator=gen(1)).to(DEVICE)
    got = weighted_sum(y, w)
    exact = (y.double() * w.double()[:, None]).sum(0, keepdim=True)
    assert got.shape == (1, d) and got.dtype == HALF
    ulp = 2 ** -7 if HALF == torch.bfloat16 else 2 ** -10
    assert torch.allclose(got.double(), exact, rtol=ulp, atol=1e-6)  # one rounding of a float32 sum
    assert (got == weighted_sum_reference(y, w)).float().mean() > 0.95  # fused multiply-adds may round differently


@on_device
def test_weighted_sum_of_many_tokens():
    """A prefill's sum (model.sum_ranks on a GPU): token t's K rows t*K .. t*K+K-1, each token with its own weights."""
    from moe_offload.kernels.fused import weighted_sum, weighted_sum_reference

    t, k, d = 5, 2, 1000
    y = torch.randn(t * k, d, generator=gen()).to(DEVICE, HALF)
    w = torch.rand(t, k, generator=gen(1)).to(DEVICE)
    got = weighted_sum(y, w)
    exact = (y.double().reshape(t, k, d) * w.double()[:, :, None]).sum(1)
    assert got.shape == (t, d) and got.dtype == HALF
    ulp = 2 ** -7 if HALF == torch.bfloat16 else 2 ** -10
    assert torch.allclose(got.double(), exact, rtol=ulp, atol=1e-6)
    assert (got == weighted_sum_reference(y, w)).float().mean() > 0.95
