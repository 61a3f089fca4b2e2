"""The int8-activation GEMV (kernels/gemv_int8.py) against its PyTorch references.

Two references: the same product in float64 with x replaced by its int8 rounding (what the kernel computes,
up to fp32 sums and the output's rounding), and the exact product (which it approximates within the int8
rounding of x). On a CUDA GPU the tests run there; without one, when Triton is installed, under Triton's
interpreter in a subprocess (TRITON_INTERPRET=1), as tests/kernels/test_fused.py does.
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from moe_offload.quant.hqq import QuantizedTensor, QuantSpec, dequantize
from moe_offload.quant.pack import pack

from kernel_helpers import expert_stack, random_meta, run_under_interpreter

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if INTERPRETED else None
on_device = pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU or Triton's interpreter")
# Mixtral's shapes on the GPU; small ones under the (slow) interpreter, an odd N included.
SHAPES = [(14336, 4096), (4096, 14336), (1000, 4096)] if DEVICE == "cuda" else [(100, 256)]
U = 2.0**-8  # bfloat16 unit roundoff: the output's one rounding


@pytest.mark.skipif(DEVICE is not None or importlib.util.find_spec("triton") is None,
                    reason="runs the tests below under Triton's interpreter when there is no GPU")
def test_int8_gemv_under_the_triton_interpreter():
    run_under_interpreter(__file__)


def weight(n, k, bits, group, quant_meta=0, seed=0):
    """quant_meta: 0 float16 scales/zeros, 8 (or True) 8-bit codes, 4: 4-bit codes sharing a byte per group."""
    g = torch.Generator().manual_seed(seed)
    ng = k // group
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    scale = (torch.rand(n, ng, generator=g) + 0.5) * (0.05 / 2**bits)
    zero = torch.rand(n, ng, generator=g) * (2**bits - 1)
    meta_bits = 4 if quant_meta == 4 else 8
    if quant_meta:
        s, z = random_meta(scale, zero, meta_bits, g, DEVICE)
    else:
        s, z = scale.half().to(DEVICE), zero.half().to(DEVICE)
    qt = QuantizedTensor(pack(codes, bits).to(DEVICE), s, z, (n, k), QuantSpec(bits, group, bool(quant_meta), meta_bits))
    return qt, dequantize(qt, torch.float32).double()


def activations(m, k, dtype, seed=1):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, ::37] *= 20  # outliers: blocks whose step is set by one large value
    if k >= 64:
        x[:, 32:64] = 0  # an all-zero block (step 0)
    return x.to(DEVICE, dtype)


def weights_of(qt):
    from moe_offload.kernels import quant_kernels as Q

    n, k = qt.shape
    return Q._weight(qt.qweight, qt.scale, qt.zero, qt.spec.bits, qt.spec.group_size, n, k)


def check(y, x, w, out_ulps=1.0):
    """y against both references: x8 (float64) within the output's rounding; exact within the int8 error."""
    from moe_offload.kernels.gemv_int8 import fake_quantize_reference

    x8 = fake_quantize_reference(x).double()
    ref8 = x8 @ w.T
    yf = y.double()
    assert torch.isfinite(yf).all()
    bound = out_ulps * U * ref8.abs() + 1e-5 * (x8.abs() @ w.abs().T) + 1e-6
    assert ((yf - ref8).abs() <= bound).all(), ((yf - ref8).abs() / bound).max()
    exact = x.double() @ w.T
    err_bound = (x.double() - x8).abs() @ w.abs().T  # the int8 rounding's worst case
    assert ((yf - exact).abs() <= err_bound + bound).all()
    assert (yf - exact).norm() / exact.norm() < 0.02


@on_device
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3])
def test_quantize_activations_match_the_reference(bits, m):
    from moe_offload.kernels.gemv_int8 import _planes, quantize_activations, quantize_reference, unit

    k = 512
    x = activations(m, k, torch.float16)
    xq, xw = quantize_activations(x, bits)
    x8, step = quantize_reference(x)
    u = unit(bits)
    steps = xw[:, : k // u].cpu()
    sums = xw[:, k // u: 2 * k // u].cpu()
    assert torch.equal(steps, step.cpu().repeat_interleave(32 // u, dim=1) if u < 32 else step.cpu())
    assert torch.equal(sums, x8.cpu().float().reshape(m, k // u, u).sum(-1))
    if bits == 3:  # the high plane's words (one per block of 32) take each block's step again
        assert torch.equal(xw[:, 2 * k // u:].cpu(), step.cpu())
    # Undo the byte-plane permutation: word w of plane j holds elements E w + P b + j in byte b.
    off = 0
    for e, p in _planes(bits):
        words = xq[:, off: off + k // e * p].cpu().reshape(m, p, k // e)
        got = torch.stack([(words >> (8 * b)).to(torch.int8) for b in range(4)], -1)  # [m, P(j), W, 4(b)]
        got = got.permute(0, 2, 3, 1).reshape(m, k)  # element E w + P b + j
        assert torch.equal(got, x8.cpu()), (e, p)
        off += k // e * p


@on_device
@pytest.mark.parametrize("bits,group,quant_meta", [(2, 16, True), (2, 16, 4), (2, 32, False), (3, 64, False),
                                                   (3, 64, True), (3, 64, 4), (4, 64, False), (4, 16, False),
                                                   (8, 32, False)])
@pytest.mark.parametrize("m", [1, 2])
def test_gemv_matches_the_int8_reference(bits, group, quant_meta, m):
    for y, x, w in gemv_outputs(bits, group, quant_meta, m):
        check(y, x, w)


def gemv_outputs(bits, group, quant_meta, m, exact=False):
    """(y, x, w) of one launch per shape in SHAPES: w the dequantized weight, y filled with NaN before the launch."""
    from moe_offload.kernels import gemv_int8

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    for n, k in SHAPES:
        qt, w = weight(n, k, bits, group, quant_meta)
        x = activations(m, k, dtype)
        y = torch.full((m, n), float("nan"), device=DEVICE, dtype=dtype)
        gemv_int8.launch(x, y, bits, group, n, k, weights_of(qt), exact=exact)
        yield y, x, w


@on_device
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("split", [1, 2, 4])
def test_split_k_sums_in_a_fixed_order(split, prefetch, monkeypatch):
    from moe_offload.kernels import gemv_int8

    n, k = SHAPES[-1]
    qt, w = weight(n, k, 2, 16, True)
    x = activations(1, k, torch.float16)
    cfg = gemv_int8.config(2, 16, n, k, False)
    bu = min(cfg.bu, k // 16 // split)
    monkeypatch.setitem(gemv_int8.OVERRIDES, (2, 16, n, k, False),
                        gemv_int8.Int8Config(cfg.bn, bu, cfg.warps, split, prefetch))
    ys = []
    for _ in range(2):
        y = torch.full((1, n), float("nan"), device=DEVICE, dtype=torch.float16)
        gemv_int8.launch(x, y, 2, 16, n, k, weights_of(qt))
        ys.append(y)
    check(ys[0], x, w)
    assert torch.equal(ys[0], ys[1])


@on_device
@pytest.mark.parametrize("spec", [QuantSpec(2, 16, quant_meta=True)] + [QuantSpec(2, 16, True, 4), QuantSpec(3, 64),
                                                                          QuantSpec(4, 64)] * (DEVICE == "cuda"),
                         ids=str)  # the interpreter takes minutes for the others
def test_gated_and_grouped(spec):
    """gate+up with silu in the epilogue, then down; the grouped launch equals the per-expert ones bit for bit."""
    from moe_offload.kernels import gemv_int8

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    d, i = (1024, 2816) if DEVICE == "cuda" else (128, 128)
    _, stride, experts = expert_stack(spec, 2, d, i, DEVICE)
    x = activations(1, d, dtype)
    ids = torch.tensor([1, 0, 1], device=DEVICE, dtype=torch.int32)
    hidden = torch.full((3, i), float("nan"), device=DEVICE, dtype=dtype)
    out = torch.full((3, d), float("nan"), device=DEVICE, dtype=dtype)
    b, grp = spec.bits, spec.group_size
    gemv_int8.launch(x, hidden, b, grp, i, d, weights_of(experts[0][0]), weights_of(experts[0][1]), grouped=(ids, stride))
    gemv_int8.launch(hidden, out, b, grp, d, i, weights_of(experts[0][2]), grouped=(ids, stride))
    for row, e in enumerate(ids.tolist()):
        gate, up, down = experts[e]
        h = torch.empty((1, i), device=DEVICE, dtype=dtype)
        y = torch.empty((1, d), device=DEVICE, dtype=dtype)
        gemv_int8.launch(x, h, b, grp, i, d, weights_of(gate), weights_of(up))
        gemv_int8.launch(h, y, b, grp, d, i, weights_of(down))
        assert torch.equal(hidden[row:row + 1], h) and torch.equal(out[row:row + 1], y), f"row {row}"
        wg, wu, wd = (dequantize(t, torch.float32).double() for t in (gate, up, down))
        x8 = gemv_int8.fake_quantize_reference(x).double()
        ref_h = F.silu(x8 @ wg.T) * (x8 @ wu.T)
        assert torch.allclose(h.double(), ref_h, rtol=4 * U, atol=1e-3 * ref_h.abs().max().item())
        check(y, h, wd)  # down: its own x8 of the (rounded) hidden
        exact = F.silu(x.double() @ wg.T) * (x.double() @ wu.T) @ wd.T
        assert (y.double() - exact).norm() / exact.norm() < 0.03


# The same kernel with exact activations (``launch(..., exact=True)``): x in float32 planes, no rounding.


@on_device
@pytest.mark.parametrize("bits,group,quant_meta", [(2, 16, True), (2, 16, 4), (2, 32, False), (3, 64, False),
                                                   (3, 64, True), (4, 64, False), (8, 32, False)])
@pytest.mark.parametrize("m", [1, 2])
def test_exact_planes_gemv_matches_the_float64_reference(bits, group, quant_meta, m):
    for y, x, w in gemv_outputs(bits, group, quant_meta, m, exact=True):
        ref = x.double() @ w.T
        yf = y.double()
        assert torch.isfinite(yf).all()
        bound = U * ref.abs() + 1e-5 * (x.double().abs() @ w.abs().T) + 1e-6  # output rounding + fp32 sums
        assert ((yf - ref).abs() <= bound).all(), ((yf - ref).abs() / bound).max()


@on_device
def test_exact_planes_gated_and_split():
    """gate+up with silu, and split-K, on the exact path."""
    from moe_offload.kernels import gemv_int8

    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    n, k = SHAPES[-1]
    (g, wg), (u_, wu) = weight(n, k, 2, 16, True, seed=3), weight(n, k, 2, 16, True, seed=4)
    x = activations(1, k, dtype)
    h = torch.full((1, n), float("nan"), device=DEVICE, dtype=dtype)
    gemv_int8.launch(x, h, 2, 16, n, k, weights_of(g), weights_of(u_), exact=True)
    ref = F.silu(x.double() @ wg.T) * (x.double() @ wu.T)
    assert torch.allclose(h.double(), ref, rtol=4 * U, atol=1e-4 * ref.abs().max().item())
    cfg = gemv_int8.config(2, 16, n, k, False, exact=True)
    split = 2
    key = (2, 16, n, k, False, "exact")
    gemv_int8.OVERRIDES[key] = gemv_int8.Int8Config(cfg.bn, min(cfg.bu, k // 16 // split), cfg.warps, split, True)
    try:
        y = torch.full((1, n), float("nan"), device=DEVICE, dtype=dtype)
        gemv_int8.launch(x, y, 2, 16, n, k, weights_of(g), exact=True)
    finally:
        del gemv_int8.OVERRIDES[key]
    ref = x.double() @ wg.T
    bound = U * ref.abs() + 1e-5 * (x.double().abs() @ wg.abs().T) + 1e-6
    assert ((y.double() - ref).abs() <= bound).all()
