"""Decode attention (one query token) over a preallocated KV cache, split along the keys (flash-decoding).

A CUDA-graph decode step attends over the whole preallocated cache under a mask (static shapes). SDPA then
takes its math path (a boolean mask with grouped-query heads): it expands K/V to every query head and reads
all ``max_len`` positions, ~8 ms of a 17 ms Mixtral step at a 4096-token context. This kernel reads the
position from a device tensor and visits only keys ``<= pos`` (and inside the sliding window), each K/V
head once for all the query heads that share it.

Reference: :func:`decode_attention_reference` (SDPA in float32 under the same mask).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..errors import MoeOffloadError


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, M, WINDOW, scale,
                  H: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, DH: tl.constexpr, BLOCK: tl.constexpr,
                  SPLIT_LEN: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Program (kv head h, split s): the G query heads of h over keys [s * SPLIT_LEN, (s + 1) * SPLIT_LEN),
    as an unnormalized partial output and its running max / sum (online softmax, fp32)."""
    h = tl.program_id(0)
    s = tl.program_id(1)
    pos = tl.load(pos_ptr).to(tl.int32)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(pos - WINDOW + 1, 0)
    lo = tl.maximum(s * SPLIT_LEN, (first // BLOCK) * BLOCK)
    hi = tl.minimum((s + 1) * SPLIT_LEN, pos + 1)
    g = tl.arange(0, GP)
    d = tl.arange(0, DH)
    heads = h * G + g
    q = tl.load(q_ptr + heads[:, None] * DH + d[None, :], mask=(g < G)[:, None], other=0.0)  # [GP, DH]
    m_i = tl.full((GP,), float("-inf"), tl.float32)
    l_i = tl.zeros((GP,), tl.float32)
    acc = tl.zeros((GP, DH), tl.float32)
    base = h.to(tl.int64) * M * DH
    for start in range(lo, hi, BLOCK):
        n = start + tl.arange(0, BLOCK)
        valid = (n <= pos) & (n >= first)
        kv_offs = base + n[:, None] * DH + d[None, :]
        k = tl.load(k_ptr + kv_offs, mask=valid[:, None], other=0.0)  # [BLOCK, DH]
        scores = tl.dot(q, tl.trans(k)) * scale  # [GP, BLOCK], fp32
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)  # m_new is finite: every visited block holds a valid key
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_offs, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = s * H + heads
    tl.store(o_ptr + out[:, None] * DH + d[None, :], acc, mask=(g < G)[:, None])
    tl.store(m_ptr + out, m_i, mask=g < G)
    tl.store(l_ptr + out, l_i, mask=g < G)


@triton.jit
def _combine_kernel(o_ptr, m_ptr, l_ptr, y_ptr, H: tl.constexpr, DH: tl.constexpr, SPLITS: tl.constexpr):
    """y[head] = sum_s exp(m_s - top) o_s / sum_s exp(m_s - top) l_s, splits in order (deterministic).
    A split with no visible key has m_s = -inf and weighs nothing."""
    head = tl.program_id(0)
    d = tl.arange(0, DH)
    top = float("-inf")
    for s in tl.static_range(SPLITS):
        top = tl.maximum(top, tl.load(m_ptr + s * H + head))
    num = tl.zeros((DH,), tl.float32)
    den = 0.0
    for s in tl.static_range(SPLITS):
        m_s = tl.load(m_ptr + s * H + head)
        w = tl.where(m_s == float("-inf"), 0.0, tl.exp(m_s - top))
        num += w * tl.load(o_ptr + (s * H + head) * DH + d)
        den += w * tl.load(l_ptr + s * H + head)
    tl.store(y_ptr + head * DH + d, (num / den).to(y_ptr.dtype.element_ty))


def decode_attention_ok(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Shapes this kernel takes: one sequence, one query token, 16-bit CUDA tensors, a power-of-two head dim."""
    B, H, S, DH = q.shape
    return (q.is_cuda and B == 1 and S == 1 and q.dtype in (torch.bfloat16, torch.float16) and keys.dtype == q.dtype
            and DH in (16, 32, 64, 128, 256) and H % keys.shape[1] == 0 and keys.is_contiguous())


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                     window: int | None = None) -> torch.Tensor:
    """q [1, H, 1, Dh] against keys/values [1, Hk, M, Dh] at positions 0..pos (``pos``: one-element device
    tensor; with ``window``, only the last ``window`` of them) -> [1, H, 1, Dh]. Scale 1/sqrt(Dh)."""
    if not decode_attention_ok(q, keys) or values.shape != keys.shape or not values.is_contiguous():
        raise MoeOffloadError(f"decode_attention: unsupported shapes q {tuple(q.shape)} keys {tuple(keys.shape)}")
    _, H, _, DH = q.shape
    Hk, M = keys.shape[1], keys.shape[2]
    G = H // Hk
    block = 64
    split_len = max(block, triton.next_power_of_2(triton.cdiv(M, 16)))  # about 16 splits over the cache
    splits = triton.cdiv(M, split_len)
    o = torch.empty((splits, H, DH), device=q.device, dtype=torch.float32)
    m = torch.empty((splits, H), device=q.device, dtype=torch.float32)
    l = torch.empty((splits, H), device=q.device, dtype=torch.float32)  # noqa: E741
    y = torch.empty((1, H, 1, DH), device=q.device, dtype=q.dtype)
    _split_kernel[(Hk, splits)](
        q.contiguous(), keys, values, pos, o, m, l, M, window or 0, 1.0 / math.sqrt(DH),
        H=H, G=G, GP=max(16, triton.next_power_of_2(G)), DH=DH, BLOCK=block, SPLIT_LEN=split_len,
        HAS_WINDOW=window is not None, num_warps=4, num_stages=2)
    _combine_kernel[(H,)](o, m, l, y, H=H, DH=DH, SPLITS=splits, num_warps=4)
    return y


def decode_attention_if_supported(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                                  window: int | None = None) -> torch.Tensor | None:
    """``decode_attention`` where its shapes are supported, else None (the caller falls back to SDPA)."""
    if not decode_attention_ok(q, keys):
        return None
    return decode_attention(q, keys, values, pos, window)


def decode_attention_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                               window: int | None = None) -> torch.Tensor:
    """The semantics: float32 SDPA of q over keys 0..pos (inside the window), heads grouped (GQA)."""
    M = keys.shape[2]
    p = int(pos.reshape(-1)[0])
    n = torch.arange(M, device=q.device)
    mask = n <= p
    if window is not None:
        mask &= (p - n) < window
    G = q.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(G, dim=1)
    v = values.float().repeat_interleave(G, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask[None, None, None, :])
    return out.to(q.dtype)
