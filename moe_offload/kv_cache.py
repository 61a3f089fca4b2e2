"""KVCache: preallocated keys/values for every layer, so decode never allocates.

Dimension legend: L layers, B batch, Hk key/value heads, M max positions, Dh head dim.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)  # [L, B, Hk, M, Dh]
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # positions 0..length-1 hold valid keys/values

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k/v [B, Hk, S, Dh] at positions start..start+S-1; return all keys/values up to there."""
        end = start + k.shape[2]
        assert end <= self.max_len, f"KV cache overflow: {end} > {self.max_len}"
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def update_at(self, layer: int, position: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write one position (``position``: a one-element device tensor) without a host sync; return the
        whole cache of the layer [B, Hk, M, Dh], for attention under a mask (static shapes: CUDA graphs)."""
        self.k[layer].index_copy_(2, position, k)
        self.v[layer].index_copy_(2, position, v)
        return self.k[layer], self.v[layer]

    def truncate(self, length: int) -> None:
        """Forget positions >= length (their stale values are overwritten before they are read)."""
        assert 0 <= length <= self.length
        self.length = length

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
