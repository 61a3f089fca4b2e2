"""CpuExpert over a flat expert buffer, and run_experts: one C call for a layer's CPU experts where the integer
path covers them, against the experts called one by one."""

import dataclasses

import pytest
import torch

from moe_offload.cpu_expert import CpuExpert, run_experts
from moe_offload.kernels import cpu
from moe_offload.quant.hqq import quantize
from moe_offload.quant.presets import make_preset
from moe_offload.synthetic import synthetic_config
from moe_offload.weights import expert_layout, expert_shapes

pytestmark = pytest.mark.skipif(not cpu.available() or not cpu.int8_available(), reason="no AVX2 CPU kernel")


def experts(n: int, hidden: int = 256, intermediate: int = 768) -> list[CpuExpert]:
    config = dataclasses.replace(synthetic_config("mixtral-8x7b"), hidden_size=hidden, intermediate_size=intermediate)
    preset = make_preset("4/2")
    layout = expert_layout(config, preset, torch.float32)
    out = []
    for e in range(n):
        torch.manual_seed(e)
        tensors = {}
        for proj, shape in expert_shapes(config).items():
            for name, t in quantize(torch.randn(shape) * 0.5, preset.experts, optimize=False).tensors().items():
                tensors[f"{proj}.{name}"] = t
        out.append(CpuExpert(layout.views(layout.pack(tensors)), config, preset.experts))
    return out


def test_run_experts_fuses_and_matches_one_by_one():
    ex = experts(2)
    assert all(e.fused_parts() is not None for e in ex)
    x = torch.randn(1, 256)
    together = run_experts(ex, x, threads=2)
    for e, y in zip(ex, together):
        one = e(x, threads=2)
        assert y.shape == one.shape == (1, 256)
        assert (y - one).norm() / one.norm() < 1e-3


def test_run_experts_falls_back_for_several_tokens():
    ex = experts(1)
    x = torch.randn(2, 256)
    assert torch.equal(run_experts(ex, x, threads=2)[0], ex[0](x, threads=2))
