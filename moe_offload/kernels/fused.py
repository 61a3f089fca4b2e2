"""Fused decode-step kernels for the small operations between the matmuls (Triton), each beside its reference.

At batch 1 a Mixtral decode step reads ~5 GB of weights in ~5 ms of GEMVs, yet eager PyTorch adds about
forty tiny kernels per layer around them (an RMSNorm alone is seven: cast, square, mean, add, rsqrt,
multiply, cast, scale), each 2-3 us of GPU time even inside a CUDA graph: ~3.5 ms per token. Each function
here does one such group in one launch, and returns ``None`` where it does not apply (the caller then runs
its PyTorch code, which is also the reference):

* :func:`rms_norm` - :func:`rms_norm_reference` (``model.RMSNorm``'s formula);
* :func:`rope` - :func:`rope_reference` (``model.apply_rope`` on q and k of one token);
* :func:`route` - :func:`route_reference` (``model.Router``: float32 softmax, top-k, optional renormalization);
* :func:`weighted_sum` - :func:`weighted_sum_reference` (each token's expert outputs summed in rank order, float32).

Rounding: RoPE rounds after every multiply and the add like eager code; it matches it but for a rare unit in
the last place (bfloat16 on an H100). The reductions (the norm's mean of squares, the softmax) add in another order than PyTorch, so they
agree to float32 rounding, not bit for bit; every decode path (resident, offloaded, graphed or not) runs
the same kernels, so offloading still changes no output bit.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter runs the kernels on CPU tensors (tests)


def _on_device(t: torch.Tensor) -> bool:
    return t.is_cuda or _INTERPRET


# ----------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < D
    x = tl.load(x_ptr + row * D + offs, mask=inside, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / D + eps)
    normed = (x * r).to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference casts back before the scale
    w = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=inside)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm over the last dimension of x (any leading shape), one program per row; None if unsupported."""
    D = x.shape[-1]
    if (not _on_device(x) or x.dtype not in _FLOATS or weight.dtype not in _FLOATS or weight.shape != (D,)
            or not x.is_contiguous() or not weight.is_contiguous() or D > 16384):
        return None
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    rows = x.numel() // D
    if rows:
        block = triton.next_power_of_2(D)
        _rms_norm_kernel[(rows,)](x, weight, y, D, eps, BLOCK=block, num_warps=min(8, max(1, block // 256)))
    return y


# ----------------------------------------------------------------------------------------------
# RoPE (half-rotation layout) on q and k of one token
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rope_rows(src, dst, cos_ptr, sin_ptr, row, heads, stride_b, stride_h, DH: tl.constexpr):
    b = row // heads
    h = row % heads
    d = tl.arange(0, DH)
    HALF: tl.constexpr = DH // 2
    base = src + b * stride_b + h * stride_h
    x = tl.load(base + d)
    partner = tl.load(base + (d + HALF) % DH)
    rotated = tl.where(d < HALF, -partner, partner)
    c = tl.load(cos_ptr + b * DH + d)
    s = tl.load(sin_ptr + b * DH + d)
    # Round after each step like eager code in x's dtype: x * cos, rotated * sin, then their sum.
    a = (x.to(tl.float32) * c.to(tl.float32)).to(x.dtype)
    r = (rotated.to(tl.float32) * s.to(tl.float32)).to(x.dtype)
    tl.store(dst + row * DH + d, (a.to(tl.float32) + r.to(tl.float32)).to(x.dtype))


@triton.jit
def _rope_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, H, HK, sqb, sqh, skb, skh, B,
                 DH: tl.constexpr):
    row = tl.program_id(0)
    if row < B * H:
        _rope_rows(q_ptr, qo_ptr, cos_ptr, sin_ptr, row, H, sqb, sqh, DH)
    else:
        _rope_rows(k_ptr, ko_ptr, cos_ptr, sin_ptr, row - B * H, HK, skb, skh, DH)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """RoPE on one token's q [B, H, 1, Dh] and k [B, Hk, 1, Dh] (any head/batch strides) in one launch.

    cos/sin [B, 1, 1, Dh] in q's dtype. Returns new contiguous tensors, or None where unsupported."""
    B, H, S, DH = q.shape
    if (S != 1 or k.shape[0] != B or k.shape[2] != 1 or k.shape[3] != DH or not _on_device(q)
            or q.dtype not in _FLOATS or k.dtype != q.dtype or cos.dtype != q.dtype or sin.dtype != q.dtype
            or q.stride(3) != 1 or k.stride(3) != 1 or DH & (DH - 1) or DH < 2
            or cos.shape != (B, 1, 1, DH) or sin.shape != cos.shape
            or not cos.is_contiguous() or not sin.is_contiguous()):
        return None
    HK = k.shape[1]
    qo = torch.empty((B, H, 1, DH), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, HK, 1, DH), dtype=k.dtype, device=k.device)
    _rope_kernel[(B * (H + HK),)](q, k, qo, ko, cos, sin, H, HK, q.stride(0), q.stride(1), k.stride(0), k.stride(1), B,
                                  DH=DH, num_warps=1)
    return qo, ko


# ----------------------------------------------------------------------------------------------
# Router: softmax, top-k, renormalization
# ----------------------------------------------------------------------------------------------


@triton.jit
def _route_kernel(logits_ptr, w_ptr, i_ptr, E, K: tl.constexpr, BLOCK: tl.constexpr, NORMALIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK)
    z = tl.load(logits_ptr + t * E + e, mask=e < E, other=-float("inf")).to(tl.float32)
    p = tl.exp(z - tl.max(z, axis=0))
    p = p / tl.sum(p, axis=0)
    p = tl.where(e < E, p, -1.0)  # below every probability: never picked
    ks = tl.arange(0, K)
    top_w = tl.zeros((K,), tl.float32)
    top_i = tl.zeros((K,), tl.int64)
    for j in tl.static_range(K):  # the largest, ties to the lower expert, K times
        m = tl.max(p, axis=0)
        idx = tl.min(tl.where(p == m, e, BLOCK), axis=0)
        top_w = tl.where(ks == j, m, top_w)
        top_i = tl.where(ks == j, idx.to(tl.int64), top_i)
        p = tl.where(e == idx, -2.0, p)
    if NORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=0)
    tl.store(w_ptr + t * K + ks, top_w)
    tl.store(i_ptr + t * K + ks, top_i)


def route_reference(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = F.softmax(logits.float(), dim=-1)  # [T, E]
    weights, indices = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, indices


def route(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Router logits [T, E] -> float32 weights [T, K] and int64 indices [T, K] (descending); None if unsupported."""
    if (logits.dim() != 2 or not _on_device(logits) or logits.dtype not in _FLOATS or not logits.is_contiguous()
            or top_k & (top_k - 1) or not 1 <= top_k <= logits.shape[1] or logits.shape[1] > 1024):
        return None  # K must be a power of two for tl.arange (Mixtral 2, Qwen/OLMoE 8, Qwen1.5 4)
    T, E = logits.shape
    w = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    i = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    if T:
        _route_kernel[(T,)](logits, w, i, E, K=top_k, BLOCK=triton.next_power_of_2(E), NORMALIZE=normalize,
                            num_warps=1)
    return w, i


# ----------------------------------------------------------------------------------------------
# A token's expert outputs, weighted and summed
# ----------------------------------------------------------------------------------------------


@triton.jit
def _weighted_sum_kernel(y_ptr, w_ptr, out_ptr, D, K: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = d < D
    acc = tl.zeros((BLOCK,), tl.float32)
    for k in tl.static_range(K):  # rank order
        acc += (tl.load(y_ptr + (t * K + k) * D + d, mask=inside, other=0.0).to(tl.float32)
                * tl.load(w_ptr + t * K + k).to(tl.float32))
    tl.store(out_ptr + t * D + d, acc.to(out_ptr.dtype.element_ty), mask=inside)


def weighted_sum_reference(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [T*K, D] (row t*K + k: token t's k-th expert), weights [T, K] (or [K]: T = 1) -> [T, D] in y's dtype:
    sum_k weights[t, k] * y[t*K + k] in float32, k = 0, 1, ... (the model's CPU code, model.sum_ranks_reference)."""
    w = weights.reshape(-1, weights.shape[-1]).float()
    terms = y.reshape(w.shape[0], w.shape[1], -1).float() * w[:, :, None]
    acc = terms[:, 0]
    for k in range(1, w.shape[1]):
        acc = acc + terms[:, k]
    return acc.to(y.dtype)


def weighted_sum(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
    """One launch for :func:`weighted_sum_reference` (None where unsupported)."""
    w = weights.reshape(-1, weights.shape[-1]) if weights.dim() else weights
    if (y.dim() != 2 or not _on_device(y) or y.dtype not in _FLOATS or not y.is_contiguous() or w.dim() != 2
            or w.numel() != y.shape[0] or not w.is_contiguous() or w.device != y.device):
        return None
    (t, k), d = w.shape, y.shape[1]
    out = torch.empty((t, d), dtype=y.dtype, device=y.device)
    block = 1024
    _weighted_sum_kernel[(triton.cdiv(d, block), t)](y, w, out, d, K=k, BLOCK=block, num_warps=4)
    return out
