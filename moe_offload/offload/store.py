"""ExpertStore: every expert's flat buffer in host memory, the immutable source of all copies.

Buffers live in a few large chunks (one allocation per chunk, not per expert), pinned when possible
so host-to-device copies run on the copy engine at full PCIe speed. When pinning fails (WSL, small
RAM limits) the store falls back to pageable memory with one warning: slower copies, same results.
Evicting an expert from the GPU never writes back here.

``align_to`` (an address, e.g. the GPU slot buffer's): every expert buffer then starts a whole number of expert
sizes away from it, so a kernel that finds experts by index in a stack of slots can index host experts too (read in
place over PCIe: unified addressing maps pinned memory into the GPU's address space). Each chunk pays up to one
expert of padding for it.
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
    def __init__(self, layout: FlatLayout, keys: Iterable[Key], pin: bool = True, chunk_bytes: int = 1 << 30,
                 align_to: int | None = None):
        self.layout = layout
        keys = list(keys)
        B = layout.nbytes
        per_chunk = max(1, chunk_bytes // B)
        self.pinned = pin and torch.cuda.is_available()
        self._buffers: dict[Key, torch.Tensor] = {}
        for start in range(0, len(keys), per_chunk):
            group = keys[start : start + per_chunk]
            if align_to is None:
                chunk = self._allocate(len(group) * B)
            else:  # one expert more, then start where the distance to align_to is a multiple of B
                raw = self._allocate((len(group) + 1) * B)
                pad = (align_to - raw.data_ptr()) % B
                chunk = raw[pad : pad + len(group) * B]
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

    def index_from(self, key: Key, base: int) -> int:
        """How many expert sizes the expert's buffer lies from address ``base`` (a store built with align_to=base)."""
        offset = self._buffers[key].data_ptr() - base
        assert offset % self.layout.nbytes == 0, "the store was not aligned to this base"
        return offset // self.layout.nbytes

    def keys(self) -> list[Key]:
        return list(self._buffers)

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes * len(self._buffers)
