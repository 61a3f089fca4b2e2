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

    def head_parts(self, rows: int) -> tuple[object, object] | None:
        """(gate, up) over their first ``rows`` rows, for ``head`` (built once per row count: views into the store); None
        where the matrices cannot be cut (torch's int4 layout)."""
        heads = self.__dict__.setdefault("_heads", {})
        if rows not in heads:
            parts = []
            for proj in ("gate_proj", "up_proj"):
                m = self.matrices[proj]
                if isinstance(m, torch.Tensor):
                    parts.append(m[:rows])
                elif isinstance(m, cpu_kernels.CpuMatrix):
                    parts.append(cpu_kernels.CpuMatrix(m.qt.rows(0, rows), int8_activations=m.int8,
                                                       simd="avx2" if m.chunk == 128 else "auto"))
                else:
                    parts = None
                    break
            heads[rows] = None if parts is None else tuple(parts)
        return heads[rows]

    def head(self, x: torch.Tensor, rows: int, threads: int) -> torch.Tensor:
        """The expert's first ``rows`` hidden units, silu(gate x) * up x: x float32 [T, D] -> float32 [T, rows] (the
        CPU's share of a split expert; ``forward_with_head`` of the GPU module takes it from there)."""
        gate, up = self.head_parts(rows)
        x = x.float().contiguous()
        if isinstance(gate, torch.Tensor):
            return F.silu(F.linear(x.to(gate.dtype), gate).float()) * F.linear(x.to(up.dtype), up).float()
        if gate.int8 and up.int8:
            qs = [cpu_kernels.QuantizedVector(row, gate.chunk) for row in x]  # rounded once for gate and up
            return torch.stack([F.silu(gate.matvec(q, threads)) * up.matvec(q, threads) for q in qs])
        return torch.stack([F.silu(gate.matvec(row, threads)) * up.matvec(row, threads) for row in x])

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


def _fused(experts: list[CpuExpert], x: torch.Tensor, rows: int | None):
    """(gates, ups, downs) when one C call computes all these experts at x [1, D] (whole, or with ``rows`` their first
    hidden units only: downs None), else None."""
    parts = [e.fused_parts() if rows is None else e.head_parts(rows) for e in experts]
    if x.shape[0] != 1 or not parts or any(p is None for p in parts):
        return None
    gates, ups = [p[0] for p in parts], [p[1] for p in parts]
    downs = [p[2] for p in parts] if rows is None else None
    return (gates, ups, downs) if cpu_kernels.fusable(gates, ups, downs) else None


def run_experts(experts: list[CpuExpert], x: torch.Tensor, threads: int) -> list[torch.Tensor]:
    """Every expert at x float32 [1, D] -> their outputs float32 [1, D]: one parallel C call for all of them where
    the integer path covers them (one layer's CPU experts: one fork of the thread team instead of three per
    expert), else expert by expert."""
    fused = _fused(experts, x, None)
    if fused is None:
        return [e(x, threads) for e in experts]
    return list(cpu_kernels.experts_2bit_g16(*fused, x[0].float().contiguous(), threads).unsqueeze(1))


def run_heads(experts: list[CpuExpert], x: torch.Tensor, rows: int, threads: int) -> list[torch.Tensor]:
    """The first ``rows`` hidden units of every expert at x float32 [1, D] -> float32 [1, rows] each: one parallel C
    call for all of them where the integer path covers them, else expert by expert."""
    fused = _fused(experts, x, rows)
    if fused is None:
        return [e.head(x, rows, threads) for e in experts]
    return list(cpu_kernels.gate_up_2bit_g16(*fused[:2], x[0].float().contiguous(), threads).unsqueeze(1))


def start_experts(experts: list[CpuExpert], x: torch.Tensor, threads: int, rows: int | None = None,
                  signal: bool = False, on_done=None) -> cpu_kernels.Started | None:
    """``run_experts`` (or, with ``rows``, ``run_heads``) started on the C kernel's own worker thread where one fused
    call covers them: ``.wait()`` -> (float32 [n, D] or [n, rows], ms). None where it does not (run them on a thread).
    ``signal``, ``on_done``: see ``kernels.cpu.start``."""
    fused = _fused(experts, x, rows)
    if fused is None:
        return None
    return cpu_kernels.start(*fused, x[0].float().contiguous(), threads, signal, on_done)


def can_split(expert: CpuExpert) -> bool:
    """Whether this expert's gate and up can be cut by rows on the CPU (not with torch's int4 layout)."""
    return all(isinstance(expert.matrices.get(p), (torch.Tensor, cpu_kernels.CpuMatrix)) for p in ("gate_proj", "up_proj"))


# Our kernel over the store in place (int8 activations where its fast path applies, at the widest SIMD the CPU
# has; hqq-avx2: 256-bit vectors even on AVX-512 CPUs; hqq-f32: float32 always); torch's int4 over a converted copy.
CPU_KERNELS = ("hqq", "hqq-avx2", "hqq-f32", "int4")


def make_cpu_expert(config: ModelConfig, spec: QuantSpec | None, kernel: str = "hqq"):
    """Factory for the hybrid scheduler: flat views of one expert -> CpuExpert."""
    return lambda flat: CpuExpert(flat, config, spec, kernel)
