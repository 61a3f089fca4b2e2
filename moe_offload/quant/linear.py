"""QuantLinear: an ``nn.Linear`` replacement that stores HQQ-quantized weights.

The matmul is a pluggable function ``matmul(x, qt, bias) -> y``. Unless one is given at construction,
:func:`default_matmul` picks the fused Triton kernel on CUDA (when Triton is present) and otherwise
:func:`reference_matmul`, which dequantizes the whole weight and calls ``F.linear``: the semantics every
kernel must match.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MoeOffloadError
from .hqq import QuantizedTensor, QuantSpec, dequantize, quantize

MatmulFn = Callable[[torch.Tensor, QuantizedTensor, Optional[torch.Tensor]], torch.Tensor]


def reference_matmul(x: torch.Tensor, qt: QuantizedTensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """y = x @ dequantize(W).T + bias, in x's dtype. The semantics every kernel must match."""
    return F.linear(x, dequantize(qt, x.dtype), None if bias is None else bias.to(x.dtype))


def default_matmul(x: torch.Tensor) -> MatmulFn:
    """The fused Triton kernel for 16-bit activations on CUDA when Triton is present; else the reference."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        from .. import kernels

        if kernels.available():
            return kernels.quant_linear
    return reference_matmul


class QuantLinear(nn.Module):
    def __init__(self, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None, *, matmul: MatmulFn | None = None):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.spec = qt.spec
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise MoeOffloadError(f"bias shape {tuple(bias.shape)} does not match out_features={self.out_features}")
        # Buffers, not parameters: inference only, and .to(device) / state_dict carry them.
        tensors = qt.tensors()
        self._qnames = tuple(tensors)
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)
        self.matmul = matmul

    @classmethod
    def from_linear(
        cls,
        linear_or_weight: nn.Linear | torch.Tensor,
        spec: QuantSpec,
        *,
        optimize: bool = True,
        matmul: MatmulFn | None = None,
    ) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (weight and bias) or a bare [out, in] weight tensor."""
        if isinstance(linear_or_weight, nn.Linear):
            weight, bias = linear_or_weight.weight, linear_or_weight.bias
        else:
            weight, bias = linear_or_weight, None
        bias = None if bias is None else bias.detach().clone()
        return cls(quantize(weight.detach(), spec, optimize=optimize), bias, matmul=matmul)

    @property
    def qt(self) -> QuantizedTensor:
        """The stored weight as a QuantizedTensor (a view of the buffers, no copy)."""
        # Buffers were validated at construction; load_state_dict and _apply keep shapes and dtypes.
        tensors = {name: self._buffers[name] for name in self._qnames}
        return QuantizedTensor.assemble(tensors, (self.out_features, self.in_features), self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matmul = self.matmul or default_matmul(x)
        return matmul(x, self.qt, self.bias)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # module.half() / .to(bfloat16) would also cast the float16 scale/zero buffers; the storage
        # format is fixed, so keep their dtype and follow only the device. The bias casts as usual.
        before = {name: self._buffers[name] for name in self._qnames}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={s.bits}, group_size={s.group_size}, quant_meta={s.quant_meta}"
            + (f", meta_bits={s.meta_bits}" if s.quant_meta else "")
        )
