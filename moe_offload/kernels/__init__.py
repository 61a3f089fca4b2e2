"""Fused dequantize-and-multiply GPU kernels (Triton) for HQQ-packed weights.

Importing this package never needs Triton or a GPU: check :func:`available` first; the kernel
functions (in :mod:`.quant_kernels`, named so that no submodule shadows the ``quant_matmul``
function) are loaded on first use and raise ``MoeOffloadError`` where they cannot run.

* ``quant_matmul(x, packed, scale, zero, bits, group_size, n, k, out=None)``: y = x @ dequantize(W).T
* ``quant_linear(x, qt, bias=None)``: the same for a ``QuantizedTensor``; plugs into ``QuantLinear(matmul=...)``
* ``gate_up_silu(x, gate, up, out=None)``, ``expert_forward(x, gate, up, down, out=None, hidden=None)``
* ``grouped_expert_forward(x, ids, gate, up, down, expert_stride)``: K experts of a stack, chosen on the device
* ``expert_rows(x, gate, up, down, ...)``, ``route_blocks(indices, num_experts)``: prefill experts, two launches for
  any number of experts and rows, no dequantized weight in memory (:mod:`.moe_gemm`)
* ``dequantize_cuda(qt, dtype=torch.bfloat16, out=None)``
* ``decode_attention(q, keys, values, pos, window=None)``: one query token over a KV cache, keys up to pos
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from ..errors import MoeOffloadError

__all__ = ["available", "decode_attention", "dequantize_cuda", "expert_forward", "expert_rows", "gate_up_silu",
           "grouped_expert_forward", "quant_linear", "quant_matmul", "route_blocks"]
_ATTENTION = ("decode_attention",)
_MOE_GEMM = ("expert_rows", "route_blocks")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when Triton is installed and a CUDA device is visible (the kernels can run here)."""
    if importlib.util.find_spec("triton") is None:
        return False
    import torch

    return torch.cuda.is_available()


def _module(name: str = ""):
    try:
        if name in _ATTENTION:
            from . import attention as module
        elif name in _MOE_GEMM:
            from . import moe_gemm as module
        else:
            from . import quant_kernels as module
    except ImportError as e:  # no triton (CPU-only installs, CI)
        raise MoeOffloadError(f"the fused kernels need Triton and a CUDA GPU ({e}); use the reference matmul instead") from e
    return module


def __getattr__(name: str) -> Any:
    # Lazy: `from moe_offload.kernels import quant_matmul` imports Triton only when asked for.
    if name in __all__:
        return getattr(_module(name), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
