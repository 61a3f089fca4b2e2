"""Grouped expert kernels: K experts of a stack chosen by a device tensor, against the per-expert kernels
(bit for bit) and against dequantize-then-matmul in float64 (GPU only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_offload import kernels
from moe_offload.errors import MoeOffloadError
from moe_offload.quant.hqq import QuantSpec, dequantize

from kernel_helpers import expert_stack

gpu = pytest.mark.skipif(not kernels.available(), reason="needs Triton and a CUDA GPU")

SPECS = [QuantSpec(2, 16, quant_meta=True), QuantSpec(2, 16, True, meta_bits=4), QuantSpec(3, 64), QuantSpec(4, 64),
         QuantSpec(2, 32)]


def stack(spec: QuantSpec, num_experts: int, d: int, i: int, seed: int = 0):
    """A [E, B] buffer of HQQ-quantized experts and each expert's (gate, up, down) QuantizedTensors (views)."""
    return expert_stack(spec, num_experts, d, i, "cuda", seed)


@gpu
@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("ids", [[3, 0], [5, 1, 7, 2, 0, 6, 4, 3], [2, 2, 5]], ids=["k2", "k8", "repeat"])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_grouped_rows_equal_per_expert_kernels(spec, ids, id_dtype):
    d, i = 1024, 2816
    _, stride, experts = stack(spec, 8, d, i)
    x = torch.randn(1, d, device="cuda").bfloat16()
    dev_ids = torch.tensor(ids, dtype=id_dtype, device="cuda")
    y = kernels.grouped_expert_forward(x, dev_ids, *experts[0], stride)
    assert y.shape == (len(ids), d)
    for k, e in enumerate(ids):
        ref = kernels.expert_forward(x, *experts[e])
        assert torch.equal(y[k : k + 1], ref), f"row {k} (expert {e}) differs from the per-expert kernels"
        gate, up, down = (dequantize(t, torch.float64) for t in experts[e])
        exact = F.linear(F.silu(F.linear(x.double(), gate)) * F.linear(x.double(), up), down)
        rel = ((y[k].double() - exact[0]).norm() / exact.norm()).item()
        assert rel < 2e-2, f"expert {e}: relative error {rel:.2e} against float64 dequantize-then-matmul"


@gpu
def test_grouped_mixtral_shapes_and_combine():
    """Mixtral's expert shapes at 2-bit (the split-K down projection) and the weighted sum in rank order."""
    from moe_offload.config import ModelConfig
    from moe_offload.grouped import grouped_combine
    from moe_offload.weights import build_expert

    spec = QuantSpec(2, 16, quant_meta=True)
    _, stride, experts = stack(spec, 3, 4096, 14336)
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    ids = torch.tensor([2, 0], device="cuda")
    weights = torch.tensor([[0.7, 0.3]], device="cuda")
    y = kernels.grouped_expert_forward(x, ids, *experts[0], stride)
    for k, e in enumerate((2, 0)):
        assert torch.equal(y[k : k + 1], kernels.expert_forward(x, *experts[e]))
    config = ModelConfig("mixtral", vocab_size=8, hidden_size=4096, intermediate_size=14336, num_layers=1,
                         num_heads=32, num_kv_heads=8, head_dim=128, num_experts=3, top_k=2)
    views = {f"{proj}.{k}": v for proj, qt in zip(("gate_proj", "up_proj", "down_proj"), experts[0])
             for k, v in qt.tensors().items()}
    out = grouped_combine(x, ids, weights, build_expert(views, config, spec), stride)
    exact = 0.7 * y[0].double() + 0.3 * y[1].double()  # rank order in float32 (fused multiply-adds), one rounding
    assert torch.allclose(out[0].double(), exact, rtol=2 ** -8, atol=1e-6)


@gpu
def test_grouped_inside_cuda_graph_reads_ids_at_replay():
    spec = QuantSpec(4, 64)
    _, stride, experts = stack(spec, 4, 512, 1024)
    x = torch.randn(1, 512, device="cuda").bfloat16()
    ids = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    kernels.grouped_expert_forward(x, ids, *experts[0], stride)  # warm-up: compile, scratch
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.grouped_expert_forward(x, ids, *experts[0], stride)
    ids.copy_(torch.tensor([3, 2], dtype=torch.int32))
    graph.replay()
    assert torch.equal(y[0:1], kernels.expert_forward(x, *experts[3]))
    assert torch.equal(y[1:2], kernels.expert_forward(x, *experts[2]))


@gpu
def test_grouped_bad_input():
    spec = QuantSpec(4, 64)
    _, stride, experts = stack(spec, 2, 512, 1024)
    x = torch.randn(1, 512, device="cuda").bfloat16()
    ids = torch.tensor([0, 1], device="cuda")
    with pytest.raises(MoeOffloadError, match="expert_stride"):
        kernels.grouped_expert_forward(x, ids, *experts[0], stride + 4)
    with pytest.raises(MoeOffloadError, match="one token"):
        kernels.grouped_expert_forward(torch.randn(2, 512, device="cuda").bfloat16(), ids, *experts[0], stride)
    with pytest.raises(MoeOffloadError, match="ids"):
        kernels.grouped_expert_forward(x, ids.float(), *experts[0], stride)
    with pytest.raises(MoeOffloadError, match="do not form an expert"):
        kernels.grouped_expert_forward(x, ids, experts[0][0], experts[0][1], experts[0][0], stride)
