import pytest
import torch

from moe_offload.errors import MoeOffloadError
from moe_offload.quant.hqq import (
    QuantizedMeta,
    QuantizedTensor,
    QuantSpec,
    dequantize,
    dequantize_meta,
    meta_block,
    quantize,
    tensor_layout,
)
from moe_offload.quant.pack import unpack

BITS = (2, 3, 4, 8)
GROUPS = (16, 64, 128)


def weight(kind: str, shape=(256, 512), seed=0) -> torch.Tensor:
    """LLM-like test matrices: plain Gaussian, and Gaussian with outliers and per-row offsets."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.02
    if kind == "outliers":
        w = w + torch.randn(shape[0], 1, generator=gen) * 0.01
        mask = torch.rand(shape, generator=gen) < 0.01
        w = torch.where(mask, w * 10, w)
    return w


def mae(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def hqq_error(w: torch.Tensor, bits: int, group_size: int, quant_meta: bool) -> float:
    """Mean abs reconstruction error of the hqq library at the same setting (groups along K: axis=1)."""
    from hqq.core.quantize import Quantizer

    w_q, meta = Quantizer.quantize(
        w.clone(), nbits=bits, group_size=group_size, optimize=True, round_zero=False, axis=1, device="cpu"
    )
    if quant_meta:  # hqq's quant_scale/quant_zero (the Mixtral-offloading demo's settings)
        for key in ("scale", "zero"):
            q, m = Quantizer.quantize(meta[key], nbits=8, channel_wise=True, group_size=128, optimize=False, device="cpu")
            meta[key] = Quantizer.dequantize(q, m).float()
    return mae(Quantizer.dequantize(w_q, meta), w)


@pytest.mark.parametrize("quant_meta", [False, True])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_error_parity_with_hqq(bits, group_size, quant_meta):
    pytest.importorskip("hqq")
    for kind in ("gaussian", "outliers"):
        w = weight(kind)
        ours = mae(dequantize(quantize(w, QuantSpec(bits, group_size, quant_meta))), w)
        ref = hqq_error(w, bits, group_size, quant_meta)
        # hqq keeps scale/zero in float32 here; ours stores float16, which costs <0.5% at 8 bits.
        assert ours <= ref * 1.01, f"{kind}: ours {ours:.4e} vs hqq {ref:.4e}"


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_quant_meta_costs_little(bits, group_size):
    w = weight("outliers")
    plain = mae(dequantize(quantize(w, QuantSpec(bits, group_size))), w)
    meta = mae(dequantize(quantize(w, QuantSpec(bits, group_size, quant_meta=True))), w)
    # 8-bit zero points need sub-step precision that an 8-bit code cannot give at small groups.
    assert meta <= plain * (1.02 if bits < 8 else 1.3)


@pytest.mark.parametrize("bits", BITS)
def test_optimizer_beats_round_to_nearest(bits):
    for kind in ("gaussian", "outliers"):
        w = weight(kind, seed=1)
        spec = QuantSpec(bits, 64)
        hqq = mae(dequantize(quantize(w, spec)), w)
        rtn = mae(dequantize(quantize(w, spec, optimize=False)), w)
        assert hqq < rtn * 0.99, f"{kind}: optimized {hqq:.4e} vs min-max {rtn:.4e}"


@pytest.mark.parametrize("quant_meta", [False, True])
def test_8bit_near_lossless(quant_meta):
    w = weight("outliers")
    w_r = dequantize(quantize(w, QuantSpec(8, 64, quant_meta)))
    assert torch.linalg.norm(w_r - w) / torch.linalg.norm(w) < 0.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype):
    w = weight("gaussian", (64, 256)).to(dtype)
    spec = QuantSpec(4, 64)
    qt = quantize(w, spec)
    ref = quantize(w.float(), spec)  # math is float32 either way
    assert torch.equal(qt.qweight, ref.qweight) and torch.equal(qt.scale, ref.scale) and torch.equal(qt.zero, ref.zero)
    w_r = dequantize(qt, dtype)
    assert w_r.dtype == dtype
    assert torch.linalg.norm(w_r.float() - w.float()) / torch.linalg.norm(w.float()) < 0.15


@pytest.mark.parametrize("quant_meta", [False, True])
@pytest.mark.parametrize("bits", BITS)
def test_dequantize_contract(bits, quant_meta):
    """dequantize == (q - zero[k // G]) * scale[k // G] from the stored tensors, as kernels compute it."""
    n, k, g = 8, 3584, 16  # M = 224 groups: meta block B = 112
    w = weight("outliers", (n, k))
    qt = quantize(w, QuantSpec(bits, g, quant_meta))
    t = qt.tensors()
    if quant_meta:
        b = meta_block(k // g)
        assert b == 112

        def meta(name: str) -> torch.Tensor:
            blk = torch.arange(k // g) // b
            return t[f"{name}_q"].float() * t[f"{name}_step"].float()[:, blk] + t[f"{name}_offset"].float()[:, blk]

        scale, zero = meta("scale"), meta("zero")
    else:
        scale, zero = t["scale"].float(), t["zero"].float()
    q = unpack(t["qweight"], bits, k).float()
    col = torch.arange(k) // g
    expected = (q - zero[:, col]) * scale[:, col]
    assert torch.allclose(dequantize(qt), expected, rtol=0, atol=1e-7)
    assert torch.allclose(dequantize_meta(qt.scale), scale, rtol=1e-6, atol=0)
    assert torch.allclose(dequantize_meta(qt.zero), zero, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("quant_meta", [False, True])
def test_tensors_round_trip(quant_meta):
    spec = QuantSpec(3, 64, quant_meta)
    w = weight("gaussian", (32, 512))
    qt = quantize(w, spec)
    t = qt.tensors()
    layout = tensor_layout((32, 512), spec)
    assert {name: (tuple(x.shape), x.dtype) for name, x in t.items()} == layout
    assert isinstance(qt.scale, QuantizedMeta) == quant_meta
    back = QuantizedTensor.from_tensors({name: x.clone() for name, x in t.items()}, (32, 512), spec)
    assert torch.equal(dequantize(back), dequantize(qt))
    assert qt.nbytes == sum(x.numel() * x.element_size() for x in t.values())
    assert qt.to("cpu").shape == (32, 512)

    missing = dict(t)
    missing.pop("qweight")
    with pytest.raises(MoeOffloadError, match="expected tensors"):
        QuantizedTensor.from_tensors(missing, (32, 512), spec)
    wrong = dict(t)
    wrong["qweight"] = t["qweight"].to(torch.int64)
    with pytest.raises(MoeOffloadError, match="qweight"):
        QuantizedTensor.from_tensors(wrong, (32, 512), spec)


def test_nbytes():
    qt = quantize(weight("gaussian"), QuantSpec(4, 64))  # 256 x 512
    assert qt.nbytes == 256 * 512 // 2 + 2 * 256 * 8 * 2  # 4-bit codes + fp16 scale and zero
    qt = quantize(weight("gaussian"), QuantSpec(4, 64, quant_meta=True))  # M = 8, one block per row
    assert qt.nbytes == 256 * 512 // 2 + 2 * (256 * 8 + 256 * 1 * 4)


def test_meta_block():
    assert [meta_block(m) for m in (1, 7, 64, 128, 224, 256, 384, 130)] == [1, 7, 64, 128, 112, 128, 128, 65]


def test_degenerate_groups():
    assert torch.equal(dequantize(quantize(torch.zeros(4, 64), QuantSpec(4, 32))), torch.zeros(4, 64))
    w = torch.full((4, 64), 0.37)
    for quant_meta in (False, True):
        w_r = dequantize(quantize(w, QuantSpec(2, 32, quant_meta)))
        assert torch.allclose(w_r, w, atol=1e-3)


def test_spec_validation():
    for bits in (1, 5, 16):
        with pytest.raises(MoeOffloadError, match=f"bits={bits}"):
            QuantSpec(bits, 64)
    for g in (4, 12, 48, 0):
        with pytest.raises(MoeOffloadError, match=f"group_size={g}"):
            QuantSpec(4, g)
    with pytest.raises(MoeOffloadError, match="group_size=64 must divide K=96"):
        quantize(torch.randn(4, 96), QuantSpec(4, 64))
    with pytest.raises(MoeOffloadError, match="K=48"):
        quantize(torch.randn(4, 48), QuantSpec(4, 16))
    with pytest.raises(MoeOffloadError, match="NaN"):
        quantize(torch.full((4, 64), float("nan")), QuantSpec(4, 32))
    with pytest.raises(MoeOffloadError, match=r"\[N, K\]"):
        quantize(torch.randn(2, 4, 64), QuantSpec(4, 32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant_meta", [False, True])
def test_cuda_matches_cpu(quant_meta):
    w = weight("outliers")
    spec = QuantSpec(4, 64, quant_meta)
    qt = quantize(w.cuda(), spec)
    assert qt.device.type == "cuda"
    on_gpu = mae(dequantize(qt).cpu(), w)
    on_cpu = mae(dequantize(quantize(w, spec)), w)
    assert on_gpu <= on_cpu * 1.001
    assert torch.allclose(dequantize(qt.to("cpu")), dequantize(qt).cpu())
