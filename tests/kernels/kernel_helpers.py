"""Shared by the kernel tests: running a test file under Triton's interpreter, and a stack of quantized experts
laid out as the offload cache's slots."""

from __future__ import annotations

import re
import subprocess
import sys

import torch


def run_under_interpreter(path: str) -> None:
    """Run the test file at ``path`` with TRITON_INTERPRET=1 in a subprocess; every test but the launcher passes."""
    import os

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", path],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    skipped = re.search(r"(\d+) skipped", summary)
    assert " passed" in summary and (skipped is None or skipped.group(1) == "1"), summary  # only the launcher skips


def expert_stack(spec, num_experts: int, d: int, i: int, device, seed: int = 0):
    """A [E, B] byte buffer of HQQ-quantized experts and each expert's (gate, up, down) QuantizedTensor views.

    Returns (buffer, bytes per expert, experts)."""
    from moe_offload.flat import FlatLayout
    from moe_offload.quant.hqq import QuantizedTensor, quantize

    g = torch.Generator(device=device).manual_seed(seed)
    shapes = (("gate_proj", (i, d)), ("up_proj", (i, d)), ("down_proj", (d, i)))
    flats = []
    for _ in range(num_experts):
        flat = {}
        for proj, shape in shapes:
            w = torch.randn(shape, device=device, generator=g) / d**0.5
            flat.update({f"{proj}.{k}": v for k, v in quantize(w, spec).tensors().items()})
        flats.append(flat)
    layout = FlatLayout.of(flats[0])
    buffer = torch.empty((num_experts, layout.nbytes), dtype=torch.uint8, device=device)
    experts = []
    for e, flat in enumerate(flats):
        views = layout.views(buffer[e])
        for name, view in views.items():
            view.copy_(flat[name])
        experts.append(tuple(
            QuantizedTensor.assemble({k.split(".", 1)[1]: v for k, v in views.items() if k.startswith(proj + ".")},
                                     shape, spec) for proj, shape in shapes))
    return buffer, layout.nbytes, experts


def random_meta(scale: torch.Tensor, zero: torch.Tensor, meta_bits: int, g: torch.Generator, device=None):
    """Quantized scale and zero with random codes and a step and offset per block scaled to each (the kernels only
    read the storage format), on ``device`` (default: scale's). 4-bit: both codes in one random byte per group, the
    scale's low, the zero's high."""
    from moe_offload.quant.hqq import QuantizedMeta, meta_block

    n, ng = scale.shape
    nb = ng // meta_block(ng)
    top = 2**meta_bits - 1

    device = scale.device if device is None else device

    def step_offset(v):
        peak = v.reshape(n, nb, -1).amax(-1)
        return (peak / top).half().to(device), (-0.1 * peak).half().to(device)

    def codes():
        return torch.randint(0, 256, (n, ng), generator=g, dtype=torch.uint8, device=g.device).to(device)

    if meta_bits == 8:
        return QuantizedMeta(codes(), *step_offset(scale)), QuantizedMeta(codes(), *step_offset(zero))
    shared = codes()
    return QuantizedMeta(shared, *step_offset(scale), 4, 0), QuantizedMeta(shared, *step_offset(zero), 4, 4)
