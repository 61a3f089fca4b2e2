"""Bit packing of quantized codes into int32 words: the storage contract every kernel implements.

Layout (the only one; kernels read exactly this):

* A weight matrix W has shape [N, K] (N = out_features, K = in_features, as ``nn.Linear.weight``).
  Its codes q are integers in [0, 2**bits). Leading dimensions beyond N are allowed and packed
  independently; everything below talks about one row.
* K must be a multiple of 32 for every bit width, so every row fills whole words.
* Storage is an int32 tensor, row-major, shape [N, K * bits // 32].
* bits in {2, 4, 8}: each word holds ``32 // bits`` consecutive codes along K. The code of element k
  sits in word ``k // (32 // bits)`` at bit offset ``bits * (k % (32 // bits))`` (lowest bits hold
  the first element). So ``q[k] = (word >> (bits * (k % per))) & (2**bits - 1)`` with ``word``
  read as unsigned 32-bit.
* bits == 3: the row is two bit planes concatenated along the word axis:
    - words [0, K/16): the low 2 bits of every code, packed exactly like 2-bit codes;
    - words [K/16, K/16 + K/32): the high bit of every code, element k in word ``K/16 + k // 32``
      at bit ``k % 32``.
  ``q[k] = low2[k] | (high1[k] << 2)``; 3 bits per weight exactly (K/16 + K/32 = 3K/32 words).
* Words are stored as int32 two's complement; a word whose bit 31 is set is negative. Readers must
  treat it as unsigned (mask after widening, or use logical shifts).
"""

from __future__ import annotations

import torch

from ..errors import MoeOffloadError

SUPPORTED_BITS = (2, 3, 4, 8)


def _check(k: int, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise MoeOffloadError(f"bits={bits} is not supported; supported: {', '.join(map(str, SUPPORTED_BITS))}")
    if k <= 0 or k % 32 != 0:
        raise MoeOffloadError(f"K={k} (in_features) must be a positive multiple of 32 to pack {bits}-bit codes")


def packed_words(k: int, bits: int) -> int:
    """Number of int32 words per row for K codes of the given bit width."""
    _check(k, bits)
    return k * bits // 32


def _pack_plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes: int64 [..., K] with values < 2**bits, bits in {1, 2, 4, 8} -> int32 [..., K*bits/32]."""
    per = 32 // bits
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    # Fields are disjoint, so the sum is the bitwise OR; int64 holds the full unsigned 32-bit word.
    words = (grouped << shifts).sum(dim=-1)
    # Map [2**31, 2**32) onto negative int32 explicitly so bit 31 survives the narrowing.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack_plane(words: torch.Tensor, bits: int) -> torch.Tensor:
    """words: int32 [..., W] -> int64 codes [..., W * 32/bits]."""
    per = 32 // bits
    shifts = torch.arange(per, device=words.device, dtype=torch.int64) * bits
    # Widen and mask so negative words read as unsigned (no sign bits shifted in).
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    codes = (unsigned.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return codes.reshape(*words.shape[:-1], words.shape[-1] * per)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [..., K] (uint8 or any integer dtype) into int32 words [..., K*bits//32]."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.dim() < 1:
        raise MoeOffloadError(f"pack expects an integer code tensor with at least 1 dim, got {codes.dtype} {tuple(codes.shape)}")
    k = codes.shape[-1]
    _check(k, bits)
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise MoeOffloadError(f"codes must lie in [0, {2**bits - 1}] for {bits}-bit packing")
    if bits == 3:
        return torch.cat([_pack_plane(c & 3, 2), _pack_plane(c >> 2, 1)], dim=-1)
    return _pack_plane(c, bits)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words [..., K*bits//32] -> uint8 codes [..., K]."""
    words = packed_words(k, bits)
    if packed.dtype != torch.int32 or packed.dim() < 1 or packed.shape[-1] != words:
        raise MoeOffloadError(
            f"packed {bits}-bit weights for K={k} must be int32 [..., {words}], got {packed.dtype} {tuple(packed.shape)}"
        )
    if bits == 3:
        low = _unpack_plane(packed[..., : k // 16], 2)
        high = _unpack_plane(packed[..., k // 16 :], 1)
        codes = low | (high << 2)
    else:
        codes = _unpack_plane(packed, bits)
    return codes.to(torch.uint8)
