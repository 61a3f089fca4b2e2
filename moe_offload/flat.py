"""FlatLayout: a named set of tensors laid out in one contiguous byte buffer.

An expert (all tensors of gate/up/down, quantized or not) is stored as one such buffer: on disk it is
one read, in pinned host memory one host-to-device copy, and on the GPU a slot whose tensors are views
into the buffer, so loading an expert never allocates. This module knows nothing about models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ALIGN = 64  # bytes; keeps every view aligned for vectorized loads

DTYPE_NAMES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.int32: "int32", torch.uint8: "uint8", torch.int8: "int8", torch.int64: "int64",
}
DTYPES_BY_NAME = {v: k for k, v in DTYPE_NAMES.items()}


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the buffer start

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class FlatLayout:
    fields: tuple[Field, ...]
    nbytes: int

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "FlatLayout":
        """Layout for these tensors, in sorted name order, each start aligned to ALIGN bytes."""
        fields, offset = [], 0
        for name in sorted(tensors):
            t = tensors[name]
            field = Field(name, t.dtype, tuple(t.shape), offset)
            fields.append(field)
            offset += -(-field.nbytes // ALIGN) * ALIGN
        return cls(tuple(fields), offset)

    def pack(self, tensors: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy tensors into one uint8 buffer (``out`` if given) following this layout."""
        if set(tensors) != {f.name for f in self.fields}:
            raise ValueError(f"tensor names {sorted(tensors)} do not match layout {[f.name for f in self.fields]}")
        if out is None:
            out = torch.zeros(self.nbytes, dtype=torch.uint8)
        for view, f in zip(self.views(out).values(), self.fields):
            t = tensors[f.name]
            if t.dtype != f.dtype or tuple(t.shape) != f.shape:
                raise ValueError(f"{f.name}: got {t.dtype} {tuple(t.shape)}, layout wants {f.dtype} {f.shape}")
            view.copy_(t)
        return out

    def views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Typed views into a uint8 buffer of ``nbytes`` (no copies)."""
        assert buffer.dtype == torch.uint8 and buffer.numel() == self.nbytes, (buffer.dtype, buffer.numel(), self.nbytes)
        return {
            f.name: buffer[f.offset : f.offset + f.nbytes].view(f.dtype).view(f.shape) for f in self.fields
        }

    def to_json(self) -> dict[str, Any]:
        return {"nbytes": self.nbytes, "fields": [
            {"name": f.name, "dtype": DTYPE_NAMES[f.dtype], "shape": list(f.shape), "offset": f.offset}
            for f in self.fields
        ]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FlatLayout":
        fields = tuple(
            Field(f["name"], DTYPES_BY_NAME[f["dtype"]], tuple(f["shape"]), int(f["offset"])) for f in data["fields"]
        )
        return cls(fields, int(data["nbytes"]))
