"""Expert modules over flat buffers: a split expert (its first hidden units computed elsewhere) against the whole one,
and the byte ranges a split expert's copy moves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_offload.config import ModelConfig
from moe_offload.flat import FlatLayout
from moe_offload.quant.hqq import QuantSpec, dequantize, quantize
from moe_offload.weights import build_expert, head_split_ranges

CONFIG = ModelConfig("mixtral", vocab_size=16, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                     num_kv_heads=2, head_dim=16, num_experts=1, top_k=1)
SHAPES = {"gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


def flat_expert(spec: QuantSpec | None, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    flat = {}
    for proj, shape in SHAPES.items():
        w = torch.randn(shape, generator=g) * 0.3
        if spec is None:
            flat[f"{proj}.weight"] = w
        else:
            flat.update({f"{proj}.{k}": v for k, v in quantize(w, spec).tensors().items()})
    return flat


def head_reference(flat, spec, x, units):
    """silu(gate x) * up x for the first ``units`` rows, float64 from dequantized (or plain) weights."""
    w = {}
    for proj in ("gate_proj", "up_proj"):
        if spec is None:
            w[proj] = flat[f"{proj}.weight"].double()
        else:
            from moe_offload.quant.hqq import QuantizedTensor

            parts = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(proj + ".")}
            w[proj] = dequantize(QuantizedTensor.assemble(parts, SHAPES[proj], spec), torch.float64)
    xd = x.double()
    return (F.silu(xd @ w["gate_proj"][:units].T) * (xd @ w["up_proj"][:units].T)).float()


@pytest.mark.parametrize("spec", [None, QuantSpec(4, 32), QuantSpec(2, 16, True)], ids=["fp32", "4bit", "2bit-q8meta"])
@pytest.mark.parametrize("units", [0, 32, 96, 128])
def test_forward_with_head_equals_the_whole_expert(spec, units):
    flat = flat_expert(spec)
    expert = build_expert(flat, CONFIG, spec)
    x = torch.randn(3, 64)
    head = head_reference(flat, spec, x, units)
    calls = []
    got = expert.forward_with_head(x, units, lambda: calls.append(1) or head)
    assert calls == [1]  # the head is asked for once
    torch.testing.assert_close(got, expert(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", [None, QuantSpec(2, 16, True)], ids=["fp32", "2bit-q8meta"])
@pytest.mark.parametrize("units", [0, 64, 128])
def test_split_ranges_hold_everything_the_gpu_share_reads(spec, units):
    """Copy only the ranges into a buffer of garbage: the split expert still computes the whole expert's output, and
    the ranges move the expected bytes (all of down, gate and up without their first rows)."""
    flat = flat_expert(spec)
    layout = FlatLayout.of(flat)
    full = layout.pack(flat)
    ranges = head_split_ranges(layout, units)
    partial = torch.full_like(full, 0x7F)  # NaN-ish float16 / huge int patterns where nothing was copied
    for a, b in ranges:
        partial[a:b] = full[a:b]
    assert all(a < b for a, b in ranges) and all(b1 <= a2 for (_, b1), (a2, _) in zip(ranges, ranges[1:]))
    per_row = sum(f.nbytes // f.shape[0] for f in layout.fields if not f.name.startswith("down_proj"))
    padding = layout.nbytes - sum(f.nbytes for f in layout.fields)
    moved = sum(b - a for a, b in ranges)
    assert layout.nbytes - padding - units * per_row <= moved <= layout.nbytes - units * per_row
    x = torch.randn(2, 64)
    whole = build_expert(layout.views(full), CONFIG, spec)(x)
    split = build_expert(layout.views(partial), CONFIG, spec)
    got = split.forward_with_head(x, units, lambda: head_reference(flat, spec, x, units))
    torch.testing.assert_close(got, whole, rtol=1e-4, atol=1e-5)
