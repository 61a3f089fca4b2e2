import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe_offload.errors import MoeOffloadError
from moe_offload.quant.hqq import QuantSpec, dequantize, quantize
from moe_offload.quant.linear import QuantLinear, reference_matmul


def make_linear(in_features=256, out_features=96, bias=True, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_meta", [False, True])
def test_forward_is_linear_of_dequantized(dtype, quant_meta):
    lin = make_linear()
    ql = QuantLinear.from_linear(lin, QuantSpec(4, 64, quant_meta))
    ql = ql.to(dtype)
    x = torch.randn(3, 5, 256).to(dtype)
    y = ql(x)
    assert y.dtype == dtype and y.shape == (3, 5, 96)
    expected = F.linear(x, dequantize(ql.qt, dtype), ql.bias.to(dtype))
    assert torch.equal(y, expected)


def test_8bit_close_to_float_layer():
    lin = make_linear(512, 128)
    ql = QuantLinear.from_linear(lin, QuantSpec(8, 64))
    x = torch.randn(16, 512)
    with torch.no_grad():
        ref = lin(x)
    assert torch.linalg.norm(ql(x) - ref) / torch.linalg.norm(ref) < 0.01


def test_from_weight_tensor_and_attributes():
    w = torch.randn(48, 128) * 0.02
    ql = QuantLinear.from_linear(w, QuantSpec(3, 32))
    assert (ql.in_features, ql.out_features) == (128, 48)
    assert ql.bias is None
    x = torch.randn(4, 128)
    assert torch.equal(ql(x), F.linear(x, dequantize(quantize(w, QuantSpec(3, 32)))))
    assert "bits=3" in repr(ql)


def test_dtype_cast_keeps_storage_format():
    ql = QuantLinear.from_linear(make_linear(), QuantSpec(4, 64)).to(torch.bfloat16)
    assert ql.qweight.dtype == torch.int32
    assert ql.scale.dtype == torch.float16 and ql.zero.dtype == torch.float16
    assert ql.bias.dtype == torch.bfloat16
    ql = ql.half().float()
    assert ql.scale.dtype == torch.float16 and ql.bias.dtype == torch.float32


def test_state_dict_round_trip():
    spec = QuantSpec(2, 32, quant_meta=True)
    ql = QuantLinear.from_linear(make_linear(), spec)
    sd = ql.state_dict()
    assert set(sd) == {"qweight", "scale_q", "scale_step", "scale_offset", "zero_q", "zero_step", "zero_offset", "bias"}
    fresh = QuantLinear.from_linear(make_linear(seed=1), spec)
    fresh.load_state_dict(sd)
    x = torch.randn(2, 256)
    assert torch.equal(fresh(x), ql(x))


def test_matmul_seam():
    calls = []

    def kernel(x, qt, bias):
        calls.append(qt.shape)
        return reference_matmul(x, qt, bias)

    lin = make_linear()
    ql = QuantLinear(quantize(lin.weight.detach(), QuantSpec(4, 64)), lin.bias.detach(), matmul=kernel)
    ql(torch.randn(2, 256))
    assert calls == [(96, 256)]


def test_bad_bias_rejected():
    qt = quantize(torch.randn(32, 64), QuantSpec(4, 32))
    with pytest.raises(MoeOffloadError, match="bias"):
        QuantLinear(qt, torch.zeros(31))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_moves_buffers():
    lin = make_linear()
    ql = QuantLinear.from_linear(lin, QuantSpec(4, 64)).cuda()
    assert all(t.is_cuda for t in ql.qt.tensors().values()) and ql.bias.is_cuda
    x = torch.randn(2, 256)
    assert torch.allclose(ql(x.cuda()).cpu(), ql.cpu()(x), atol=1e-5)
