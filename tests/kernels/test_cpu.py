"""The CPU expert kernels against a float64 dequantize-then-multiply reference."""

import pytest
import torch

from moe_offload.errors import MoeOffloadError
from moe_offload.kernels import cpu
from moe_offload.quant.hqq import QuantSpec, dequantize, quantize

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"no CPU kernel: {cpu.unavailable_reason()}")

SPECS = [QuantSpec(2, 16, True), QuantSpec(2, 32), QuantSpec(3, 64), QuantSpec(4, 64), QuantSpec(8, 64),
         QuantSpec(4, 128, True), QuantSpec(3, 16, True)]


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("shape", [(64, 512), (1024, 4096), (4096, 1024), (48, 96)])
def test_hqq_kernel_matches_reference(spec, shape):
    n, k = shape
    if k % spec.group_size:
        pytest.skip("group does not divide K")
    torch.manual_seed(n + k + spec.bits)
    qt = quantize(torch.randn(n, k), spec, optimize=False)
    x = torch.randn(k)
    ref = cpu.hqq_matvec_reference(x, qt).double()
    got = cpu.CpuMatrix(qt).matvec(x, threads=2).double()
    # float32 accumulation over K terms against a float64 reference
    assert (got - ref).abs().max() <= 1e-5 * k ** 0.5 * ref.abs().max()


def test_hqq_kernel_rejects_unsupported_shapes():
    qt = quantize(torch.randn(40, 64), QuantSpec(2, 16))  # 40 rows: not a multiple of 16
    with pytest.raises(MoeOffloadError, match="N % 16"):
        cpu.CpuMatrix(qt)
    qt = quantize(torch.randn(64, 64), QuantSpec(4, 64))
    with pytest.raises(MoeOffloadError, match="float32 CPU vector of 64"):
        cpu.CpuMatrix(qt).matvec(torch.randn(32), threads=1)


@pytest.mark.parametrize("spec", [QuantSpec(2, 32), QuantSpec(3, 64), QuantSpec(4, 64), QuantSpec(4, 128, True)], ids=str)
def test_int4_conversion_is_exact(spec):
    """HQQ's (q - z) * s as torch's int4 form (q - 8) * s + (8 - z) * s: in float32, the product equals the
    dequantized matrix's up to float32 rounding; bfloat16 (the fast path) within bfloat16 tolerance."""
    torch.manual_seed(spec.bits)
    qt = quantize(torch.randn(256, 512), spec, optimize=False)
    x = torch.randn(512)
    ref = (dequantize(qt, torch.float64) @ x.double())
    exact = cpu.Int4Matrix(qt, torch.float32).matvec(x, threads=1).double()
    assert (exact - ref).abs().max() <= 1e-5 * ref.abs().max()
    fast = cpu.Int4Matrix(qt).matvec(x, threads=1).double()
    assert (fast - ref).abs().max() <= 3e-2 * ref.abs().max()


def test_int4_rejects_group_16():
    with pytest.raises(MoeOffloadError, match="groups of"):
        cpu.Int4Matrix(quantize(torch.randn(32, 64), QuantSpec(2, 16, True)))
