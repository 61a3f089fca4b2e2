"""An expert computed on the host CPU, straight from its flat buffer in the expert store.

The hybrid path (``offload.hybrid``) hands some cache misses to the CPU instead of copying them to the
GPU. The CPU reads the same bytes the copy would have moved, in place: quantized experts through the
C kernel of ``kernels.cpu`` (HQQ packing, no conversion, no extra host memory), 16/32-bit experts
through torch. Math is float32, except that 2-bit group-16 experts (the 4/2 preset) round their inputs to
int8 per group of 16 for the integer fast path: the result differs from the GPU's by that rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import MoeOffloadError
from .kernels import cpu as cpu_kernels
from .quant.hqq import QuantizedTensor, QuantSpec
from .weights import expert_shapes


class CpuExpert:
    """SwiGLU expert (down(silu(gate(x)) * up(x))) over host tensors; call with float32 [T, D]."""

    def __init__(self, flat: dict[str, torch.Tensor], config: ModelConfig, spec: QuantSpec | None,
                 kernel: str = "hqq"):
        self.matrices: dict[str, object] = {}
        for proj, shape in expert_shapes(config).items():
            if spec is None:
                self.matrices[proj] = flat[f"{proj}.weight"]
                continue
            parts = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(proj + ".")}
            qt = QuantizedTensor.assemble(parts, shape, spec)
            if kernel == "int4":
                self.matrices[proj] = cpu_kernels.Int4Matrix(qt)
                continue
            if not cpu_kernels.supports(qt):
                raise MoeOffloadError(f"{proj} {shape} group {spec.group_size}: the CPU expert kernel needs rows "
                                      "and group size in multiples of 16; use --hybrid off")
            self.matrices[proj] = cpu_kernels.CpuMatrix(qt, int8_activations=False if kernel == "hqq-f32" else None,
                                                        simd="avx2" if kernel == "hqq-avx2" else "auto")

    def _apply(self, proj: str, x: torch.Tensor, threads: int) -> torch.Tensor:
        m = self.matrices[proj]
        if isinstance(m, torch.Tensor):  # a 16/32-bit expert: torch's matmul in the stored dtype, no copy
            return F.linear(x.to(m.dtype), m).float()
        return torch.stack([m.matvec(row, threads) for row in x])  # a few tokens at most: rows one by one

    def fused_parts(self) -> tuple[object, object, object] | None:
        """(gate, up, down) when one C call can compute this expert with others (``run_experts``), else None."""
        parts = tuple(self.matrices.get(p) for p in ("gate_proj", "up_proj", "down_proj"))
        return parts if cpu_kernels.fusable([parts[0]], [parts[1]], [parts[2]]) else None

    def __call__(self, x: torch.Tensor, threads: int) -> torch.Tensor:
        x = x.float().contiguous()
        gate, up = self.matrices.get("gate_proj"), self.matrices.get("up_proj")
        if isinstance(gate, cpu_kernels.CpuMatrix) and gate.int8 and isinstance(up, cpu_kernels.CpuMatrix) and up.int8:
            rows = [cpu_kernels.QuantizedVector(row, gate.chunk) for row in x]  # rounded once for gate and up
            h = torch.stack([F.silu(gate.matvec(r, threads)) * up.matvec(r, threads) for r in rows])
        else:
            h = F.silu(self._apply("gate_proj", x, threads)) * self._apply("up_proj", x, threads)
        return self._apply("down_proj", h.contiguous(), threads)


def run_experts(experts: list[CpuExpert], x: torch.Tensor, threads: int) -> list[torch.Tensor]:
    """Every expert at x float32 [1, D] -> their outputs float32 [1, D]: one parallel C call for all of them where
    the integer path covers them (one layer's CPU experts: one fork of the thread team instead of three per
    expert), else expert by expert."""
    parts = [e.fused_parts() for e in experts]
    if x.shape[0] == 1 and parts and all(p is not None for p in parts):
        gates, ups, downs = (list(t) for t in zip(*parts))
        if cpu_kernels.fusable(gates, ups, downs):
            y = cpu_kernels.experts_2bit_g16(gates, ups, downs, x[0].float().contiguous(), threads)
            return list(y.unsqueeze(1))
    return [e(x, threads) for e in experts]


# Our kernel over the store in place (int8 activations where its fast path applies, at the widest SIMD the CPU
# has; hqq-avx2: 256-bit vectors even on AVX-512 CPUs; hqq-f32: float32 always); torch's int4 over a converted copy.
CPU_KERNELS = ("hqq", "hqq-avx2", "hqq-f32", "int4")


def make_cpu_expert(config: ModelConfig, spec: QuantSpec | None, kernel: str = "hqq"):
    """Factory for the hybrid scheduler: flat views of one expert -> CpuExpert."""
    return lambda flat: CpuExpert(flat, config, spec, kernel)
