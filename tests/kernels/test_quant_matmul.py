"""The fused dequantize-matmul kernels against dequantize-then-matmul in float32 (GPU only).

The error bound used throughout: the output is rounded once to bfloat16 (unit roundoff u = 2**-8),
and the tiled GEMM path also rounds each dequantized weight to x's dtype, as the reference
``F.linear(x, dequantize(qt, x.dtype))`` does. So ``|y - ref| <= u |ref| + u (|x| @ |W|.T)``, with
fp32 accumulation far below that. Every output is also checked finite and written (NaN-poisoned).
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from moe_offload import kernels
from moe_offload.errors import MoeOffloadError
from moe_offload.quant.hqq import QuantizedTensor, QuantSpec, dequantize
from moe_offload.quant.linear import QuantLinear
from moe_offload.quant.pack import pack

from kernel_helpers import random_meta

U = 2.0**-8  # bfloat16 unit roundoff

gpu = pytest.mark.skipif(not kernels.available(), reason="needs Triton and a CUDA GPU")

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (1000, 4096)]  # (N, K): Mixtral + an odd N
BITS_GROUPS = [(2, 32), (2, 128), (3, 64), (3, 128), (4, 64), (4, 128)]
MS = [1, 2, 7, 64, 512]


def test_import_needs_no_gpu():
    assert isinstance(kernels.available(), bool)
    if importlib.util.find_spec("triton") is None:
        with pytest.raises(MoeOffloadError):
            kernels.quant_matmul  # noqa: B018 - the lazy attribute itself raises


@functools.lru_cache(maxsize=2)
def weight(n: int, k: int, bits: int, group: int, quant_meta: int = 0, seed: int = 0):
    """Random codes and metadata (no quantizer: the kernels only read the storage format) + fp32 W.
    quant_meta: 0 float16 scales/zeros, 8 (or True) 8-bit codes, 4: 4-bit codes sharing one byte per group."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    ng = k // group
    codes = torch.randint(0, 2**bits, (n, k), device="cuda", generator=g)
    scale = (torch.rand(n, ng, device="cuda", generator=g) + 0.5) * (0.05 / 2**bits)
    zero = torch.rand(n, ng, device="cuda", generator=g) * (2**bits - 1)
    if quant_meta:
        meta_bits = 4 if quant_meta == 4 else 8
        scale_q, zero_q = random_meta(scale, zero, meta_bits, g)
        spec = QuantSpec(bits, group, True, meta_bits)
        qt = QuantizedTensor(pack(codes, bits), scale_q, zero_q, (n, k), spec)
    else:
        qt = QuantizedTensor(pack(codes, bits), scale.half(), zero.half(), (n, k), QuantSpec(bits, group))
    return qt, dequantize(qt, torch.float32)


def activations(m: int, k: int, dtype=torch.bfloat16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(m, k, device="cuda", generator=g).to(dtype)


def run(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    n, k = qt.shape
    out = torch.full((*x.shape[:-1], n), float("nan"), device=x.device, dtype=x.dtype)
    y = kernels.quant_matmul(x, qt.qweight, qt.scale, qt.zero, qt.spec.bits, qt.spec.group_size, n, k, out=out)
    assert y is out
    return y


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, u: float = U) -> None:
    xf = x.float().reshape(-1, w.shape[1])
    ref = xf @ w.T
    bound = u * ref.abs() + u * (xf.abs() @ w.abs().T) + 1e-6
    yf = y.float().reshape(ref.shape)
    assert torch.isfinite(yf).all(), "NaN/inf in the output (an element not written?)"
    err = (yf - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.2f}x the bound"
    rel = (err.norm() / ref.norm()).item()
    assert rel < 1e-2, f"relative error {rel:.2e}"


@gpu
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("bits,group", BITS_GROUPS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_matches_reference(n, k, bits, group, m):
    qt, w = weight(n, k, bits, group)
    x = activations(m, k)
    check(run(x, qt), x, w)


@gpu
@pytest.mark.parametrize("bits,group", [(2, 16), (2, 64), (3, 16), (3, 32), (4, 16), (4, 32), (8, 32), (8, 128)])
@pytest.mark.parametrize("m", [1, 3, 12, 64])  # 12: the tiled GEMM for 2-bit
def test_other_groups_and_8bit(bits, group, m):
    qt, w = weight(1000, 4096, bits, group)
    x = activations(m, 4096)
    check(run(x, qt), x, w)


@gpu
@pytest.mark.parametrize("meta_bits", [8, 4])
@pytest.mark.parametrize("bits,group", [(2, 16), (3, 64), (4, 64)])
@pytest.mark.parametrize("n,k", [(4096, 14336), (1000, 4096)])
@pytest.mark.parametrize("m", [1, 7, 64, 512])
def test_quantized_metadata(n, k, bits, group, m, meta_bits):
    qt, w = weight(n, k, bits, group, quant_meta=meta_bits)
    x = activations(m, k)
    check(run(x, qt), x, w)


@gpu
@pytest.mark.parametrize("m", [1, 5, 64])
def test_float16_activations(m):
    qt, w = weight(4096, 14336, 3, 64)
    x = activations(m, 14336, torch.float16)
    y = run(x, qt)
    assert y.dtype == torch.float16
    check(y, x, w)


@gpu
def test_large_m_uses_dequantize_and_cublas():
    qt, w = weight(1024, 4096, 4, 64)
    x = activations(2048, 4096)
    check(run(x, qt), x, w)
    assert torch.equal(kernels.dequantize_cuda(qt, torch.bfloat16), dequantize(qt, torch.bfloat16))


@gpu
def test_leading_dims_and_strided_rows():
    qt, w = weight(1000, 4096, 2, 32)
    wide = activations(6, 2 * 4096)
    x = wide[:, :4096].reshape(2, 3, 4096)  # rows 8192 elements apart
    y = run(x, qt)
    assert y.shape == (2, 3, 1000)
    check(y, x, w)


@gpu
@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 64)])
@pytest.mark.parametrize("m", [1, 3])
def test_gate_up_silu_and_expert(bits, group, m):
    (gate, wg), (up, wu) = weight(14336, 4096, bits, group, seed=0), weight(14336, 4096, bits, group, seed=1)
    down, wd = weight(4096, 14336, bits, group, seed=2)
    x = activations(m, 4096)
    h = kernels.gate_up_silu(x, gate, up)
    ref_h = F.silu(x.float() @ wg.T) * (x.float() @ wu.T)
    assert h.shape == (m, 14336) and torch.isfinite(h).all()
    err = (h.float() - ref_h).abs()
    assert (err <= 2 * U * ref_h.abs() + 1e-4 * ref_h.abs().max()).all()
    y = kernels.expert_forward(x, gate, up, down)
    check(y, h, wd)  # the down projection of the kernel's own (bf16) hidden state


@gpu
@pytest.mark.parametrize("split", [1, 4])
def test_deterministic_and_graph_capturable(split, monkeypatch):
    from moe_offload.kernels import quant_kernels

    gate, _ = weight(14336, 4096, 2, 32, seed=0)
    up, _ = weight(14336, 4096, 2, 32, seed=1)
    down, wd = weight(4096, 14336, 2, 32, seed=2)
    # Force split-K on the down projection (4 programs along K, reduced by the last to arrive).
    monkeypatch.setitem(quant_kernels.GEMV_OVERRIDES, (2, 32, 4096, 14336, False), quant_kernels.GemvConfig(8, 1024, 4, split))
    x = activations(1, 4096)
    first = kernels.expert_forward(x, gate, up, down)
    check(first, kernels.gate_up_silu(x, gate, up), wd)
    for _ in range(3):  # the split-K arrival counters must be back at zero after every launch
        assert torch.equal(kernels.expert_forward(x, gate, up, down), first)
    static_x, hidden, out = x.clone(), torch.empty(1, 14336, **_like(x)), torch.empty(1, 4096, **_like(x))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.expert_forward(static_x, gate, up, down, out=out, hidden=hidden)
    for seed in (5, 6):
        x2 = activations(1, 4096, seed=seed)
        static_x.copy_(x2)
        graph.replay()
        assert torch.equal(out, kernels.expert_forward(x2, gate, up, down))


@gpu
@pytest.mark.parametrize("bits,group", [(2, 32), (4, 64)])
def test_small_n_splits_k(bits, group):
    qt, w = weight(256, 4096, bits, group)  # 64 programs < 132 SMs: the default config splits K
    x = activations(1, 4096)
    check(run(x, qt), x, w)


def _like(x: torch.Tensor) -> dict:
    return {"device": x.device, "dtype": x.dtype}


@gpu
def test_quant_linear_hook():
    qt, w = weight(1024, 4096, 4, 64)
    bias = torch.randn(1024, device="cuda")
    layer = QuantLinear(qt, bias, matmul=kernels.quant_linear).to(torch.bfloat16)
    x = activations(3, 4096)
    y = layer(x)
    ref = x.float() @ w.T + bias.bfloat16().float()
    assert (y.float() - ref).norm() / ref.norm() < 1e-2


@gpu
def test_rejects_what_it_cannot_run():
    qt, _ = weight(1024, 4096, 4, 64)
    args = (qt.qweight, qt.scale, qt.zero, 4, 64, 1024, 4096)
    with pytest.raises(MoeOffloadError, match="float16"):
        kernels.quant_matmul(activations(1, 4096).float(), *args)
    with pytest.raises(MoeOffloadError, match="CUDA"):
        kernels.quant_matmul(activations(1, 4096).cpu(), *args)
    with pytest.raises(MoeOffloadError, match="K % 32"):
        kernels.quant_matmul(activations(1, 4080), qt.qweight, qt.scale, qt.zero, 4, 64, 1024, 4080)
    with pytest.raises(MoeOffloadError, match="group_size"):
        kernels.quant_matmul(activations(1, 4128), qt.qweight, qt.scale, qt.zero, 4, 64, 1024, 4128)
    with pytest.raises(MoeOffloadError, match="packed weight"):
        kernels.quant_matmul(activations(1, 4096), qt.qweight[:, :-1], qt.scale, qt.zero, 4, 64, 1024, 4096)
    with pytest.raises(MoeOffloadError, match="out must be"):
        kernels.quant_matmul(activations(1, 4096), *args, out=torch.empty(1, 1000, device="cuda", dtype=torch.bfloat16))
