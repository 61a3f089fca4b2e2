"""ExpertStore: every expert's flat buffer in host memory, the immutable source of all copies.

Buffers live in a few large chunks (one allocation per chunk, not per expert), pinned when possible
so host-to-device copies run on the copy engine at full PCIe speed. When pinning fails (WSL, small
RAM limits) the store falls back to pageable memory with one warning: slower copies, same results.
Evicting an expert from the GPU never writes back here.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch

from ..flat import FlatLayout

Key = tuple[int, int]  # (layer, expert)


def allocate_pinned(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class ExpertStore:
    def __init__(self, layout: FlatLayout, keys: Iterable[Key], pin: bool = True, chunk_bytes: int = 1 << 30):
        self.layout = layout
        keys = list(keys)
        per_chunk = max(1, chunk_bytes // layout.nbytes)
        self.pinned = pin and torch.cuda.is_available()
        self._buffers: dict[Key, torch.Tensor] = {}
        for start in range(0, len(keys), per_chunk):
            group = keys[start : start + per_chunk]
            chunk = self._allocate(len(group) * layout.nbytes)
            for i, key in enumerate(group):
                self._buffers[key] = chunk[i * layout.nbytes : (i + 1) * layout.nbytes]
        self.filled: set[Key] = set()

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self.pinned:
            try:
                return allocate_pinned(nbytes)
            except RuntimeError as e:  # e.g. "cudaHostAlloc failed": locked-memory limits, WSL
                warnings.warn(f"pinned host memory unavailable ({str(e).splitlines()[0]}); experts stay in "
                              "pageable memory and copies will be slower", RuntimeWarning, stacklevel=3)
                self.pinned = False
        return torch.empty(nbytes, dtype=torch.uint8)

    def put(self, key: Key, tensors: dict[str, torch.Tensor]) -> None:
        """Store one expert: its named tensors packed into its buffer."""
        self.layout.pack(tensors, out=self._buffers[key])
        self.filled.add(key)

    def buffer(self, key: Key) -> torch.Tensor:
        return self._buffers[key]

    def keys(self) -> list[Key]:
        return list(self._buffers)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes * len(self._buffers)
