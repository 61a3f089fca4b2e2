"""Batch-1 products with int8 activations: y = x8 @ dequantize(W).T, x8 = x rounded to int8 per block of 32.

The exact GEMV (:mod:`.quant_kernels`) turns every code into a float before its multiply-add: about three
instructions per weight, and on an H100 that instruction stream, not DRAM, sets its pace (BENCHMARKS.md).
Here the codes stay integers. A shift and an AND give four codes of a packed word as four bytes
(``(w >> 2j) & 0x03030303`` for 2 bits), and one ``dp4a`` multiplies them by four int8 activations and adds:
three instructions per four weights. Per packed word the group affine then runs once, in fp32:
``sum_k s (q_k - z) sx x8_k = s sx (sum_k q_k x8_k - z sum_k x8_k)``. This is how llama.cpp's quantized
mat-vec kernels work (its activations are int8 per block of 32 too).

Numerics: x is rounded to int8 per block of 32 elements with step ``amax / 127`` (an error of at most half a
step, 0.4% of the block's largest value); after that every product is exact integer arithmetic and every sum
fp32. So the result is ``reference(x8)`` with ``x8 = fake_quantize_reference(x)``, not ``reference(x)``: an
approximation of the exact kernels, as the hybrid CPU path is. Offloaded and resident runs use the same
kernels, so they stay bit-identical to each other.

* :func:`quantize_activations` (one small kernel per product input: x8 in the permuted byte order the GEMV
  reads, plus each packed word's step and int8 sum) and :func:`fake_quantize_reference`;
* :func:`launch` (the GEMV: gated, grouped and split-K like the exact one), driven by
  ``quant_kernels`` when ``int8_activations`` is asked for.

The same kernel also runs exact (``launch(..., exact=True)``, :func:`x_planes`): x stays float32, laid out in
planes in the order codes come out of a word, and each code becomes a float in place (one LOP3, one FADD) before
its FMA. ``quant_kernels.PLANES_EXACT`` sends the 2- and 4-bit formats' exact GEMVs here, where it measured faster
than ``quant_kernels._gemv_kernel`` (its layout keeps every thread's rows in registers; BENCHMARKS.md, session 9).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..errors import MoeOffloadError
from .quant_kernels import _ASM, _SMS, _and_or, _expert_pointers, _meta_block, _meta_value, _split_scratch, _store_rows

BLOCK = 32  # activations per int8 step


def unit(bits: int) -> int:
    """Elements per unit of work: one packed word (2/4/8 bits); 3-bit: one word of the low (2-bit) plane, the
    high plane's words (32 elements) coming one per two units."""
    return 16 if bits == 3 else 32 // bits


def _planes(bits: int) -> list[tuple[int, int]]:
    """(elements per word, byte planes) of each code plane: a word of E elements is read as E/4 byte planes."""
    return [(16, 4), (32, 8)] if bits == 3 else [(32 // bits, 32 // bits // 4)]


def x8_words(bits: int, k: int) -> int:
    """int32 words of permuted x8 per row (k bytes, twice for 3-bit: one copy per code plane)."""
    return sum(k // e * p for e, p in _planes(bits))


def xw_floats(bits: int, k: int) -> int:
    """float32 per row beside x8: each unit's step and int8 sum; 3-bit: then each block of 32's step."""
    return 2 * k // unit(bits) + (k // BLOCK if bits == 3 else 0)


# ----------------------------------------------------------------------------------------------
# References (PyTorch, any device)
# ----------------------------------------------------------------------------------------------


def quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x8 int8 [..., K], step float32 [..., K/32]); x ~ x8 * step, per block of 32."""
    k = x.shape[-1]
    if k % BLOCK:
        raise MoeOffloadError(f"int8 activations need K % {BLOCK} == 0, got K={k}")
    xb = x.float().reshape(*x.shape[:-1], k // BLOCK, BLOCK)
    amax = xb.abs().amax(-1)
    full = torch.full_like(amax, 127.0)
    # Tensor by tensor: PyTorch computes `127.0 / t` as 127 * (1 / t), one more rounding than the kernel's division.
    inv = torch.where(amax > 0, full / amax.clamp_min(1e-30), torch.zeros_like(amax))
    x8 = torch.round(xb * inv[..., None]).clamp_(-127, 127)  # ties to even
    return x8.to(torch.int8).reshape(x.shape), amax / full


def fake_quantize_reference(x: torch.Tensor) -> torch.Tensor:
    """The activations the int8 kernels multiply, as float32: x8 * step."""
    x8, step = quantize_reference(x)
    k = x.shape[-1]
    return (x8.float().reshape(*x.shape[:-1], k // BLOCK, BLOCK) * step[..., None]).reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# Device code
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pack_plane(q, xq_row, c, CH: tl.constexpr, E: tl.constexpr, P: tl.constexpr, PLANE_OFF, PLANE_WORDS):
    """Store int8 values q [CH] (chunk c of the row) as byte planes: word w of plane j holds the
    elements E w + P b + j, b = 0..3, in its bytes b (the order ``(word >> bits*j) & mask`` yields codes)."""
    W: tl.constexpr = CH // E
    q3 = tl.reshape(q, (W, 4, P))
    b = tl.arange(0, 4)[None, :, None]
    words = tl.sum((q3 & 0xFF) << (8 * b), axis=1)  # disjoint bytes: the sum is an OR
    w = c * W + tl.arange(0, W)
    tl.store(xq_row + PLANE_OFF + tl.arange(0, P)[None, :] * PLANE_WORDS + w[:, None], words)


@triton.jit
def _round_even(v, ASM: tl.constexpr):
    """v rounded to the nearest integer, ties to even (torch.round), from v itself: a separate instruction, so
    the compiler cannot fuse it with the multiply that made v (an FMA would round the exact product instead,
    and bfloat16 inputs often land exactly on ties)."""
    if ASM:
        r = tl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=f,f", [v], dtype=tl.float32, is_pure=True, pack=1)
    else:  # |v| <= 127: adding 1.5 * 2**23 leaves no fraction bits, so the add rounds to nearest even
        r = (v + 12582912.0) - 12582912.0
    return r


@triton.jit
def _quantize_kernel(x_ptr, stride_xm, xq_ptr, xw_ptr, K, XQ_STRIDE, XW_STRIDE,
                     BITS: tl.constexpr, U: tl.constexpr, CH: tl.constexpr, ASM: tl.constexpr):
    """One chunk of CH activations of row m -> int8 byte planes, and per unit of U elements its step and
    the sum of its int8 values (as float32: exact); 3-bit: then every block's step again, for the high plane's
    words (one per block). Reference: :func:`quantize_reference`."""
    m = tl.program_id(0)
    c = tl.program_id(1)
    x = tl.load(x_ptr + m * stride_xm + c * CH + tl.arange(0, CH)).to(tl.float32)
    xb = tl.reshape(x, (CH // 32, 32))
    amax = tl.max(tl.abs(xb), axis=1)
    inv = tl.where(amax > 0, tl.math.div_rn(127.0, tl.maximum(amax, 1e-30)), 0.0)  # IEEE, as the reference
    q = _round_even(xb * inv[:, None], ASM)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int32)
    step = tl.math.div_rn(amax, 127.0)
    xq_row = xq_ptr + m * XQ_STRIDE
    if BITS == 3:
        _pack_plane(tl.reshape(q, (CH,)), xq_row, c, CH, 16, 4, 0, K // 16)
        _pack_plane(tl.reshape(q, (CH,)), xq_row, c, CH, 32, 8, K // 4, K // 32)
    else:
        E: tl.constexpr = 32 // BITS
        _pack_plane(tl.reshape(q, (CH,)), xq_row, c, CH, E, E // 4, 0, K // E)
    # Per unit: its block's step and its int8 sum.
    qu = tl.reshape(q, (CH // U, U))
    su = tl.sum(qu, axis=1).to(tl.float32)
    stepu = tl.reshape(tl.broadcast_to(step[:, None], (CH // 32, 32 // U)), (CH // U,))
    u = c * (CH // U) + tl.arange(0, CH // U)
    xw_row = xw_ptr + m * XW_STRIDE
    tl.store(xw_row + u, stepu)
    tl.store(xw_row + K // U + u, su)
    if BITS == 3:
        tl.store(xw_row + 2 * (K // U) + c * (CH // 32) + tl.arange(0, CH // 32), step)


@triton.jit
def _store_planes(x, xp_row, c, CH: tl.constexpr, E: tl.constexpr, PLANE_OFF, PLANE_WORDS):
    """Chunk c of x [CH] as float32 planes: plane e holds the elements E w + e (the code at bits BITS e of word w)."""
    W: tl.constexpr = CH // E
    w = c * W + tl.arange(0, W)
    tl.store(xp_row + PLANE_OFF + tl.arange(0, E)[None, :] * PLANE_WORDS + w[:, None], tl.reshape(x, (W, E)))


@triton.jit
def _planes_kernel(x_ptr, stride_xm, xp_ptr, xw_ptr, K, XP_STRIDE, XW_STRIDE,
                   BITS: tl.constexpr, U: tl.constexpr, CH: tl.constexpr):
    """Exact path: one chunk of CH activations of row m -> float32 planes in the order fields come out of the
    packed words (3-bit: the low plane's 16, then the high plane's 32), and per unit of U elements its sum."""
    m = tl.program_id(0)
    c = tl.program_id(1)
    x = tl.load(x_ptr + m * stride_xm + c * CH + tl.arange(0, CH)).to(tl.float32)
    xp_row = xp_ptr + m * XP_STRIDE
    if BITS == 3:
        _store_planes(x, xp_row, c, CH, 16, 0, K // 16)
        _store_planes(x, xp_row, c, CH, 32, K, K // 32)
    else:
        _store_planes(x, xp_row, c, CH, 32 // BITS, 0, K // (32 // BITS))
    su = tl.sum(tl.reshape(x, (CH // U, U)), axis=1)
    tl.store(xw_ptr + m * XW_STRIDE + c * (CH // U) + tl.arange(0, CH // U), su)


@triton.jit
def _dp4a(a, b, acc, ASM: tl.constexpr):
    """acc + sum over the 4 bytes of a (unsigned) times the 4 bytes of b (signed)."""
    if ASM:
        r = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, acc],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:  # Triton's interpreter runs no PTX
        r = acc
        for i in tl.static_range(4):
            r += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
    return r


@triton.jit
def _plane_dot(words, xq_row, u_words, acc, PLANE_OFF, PLANE_WORDS,
               BITS: tl.constexpr, P: tl.constexpr, ASM: tl.constexpr):
    """acc + sum over the codes of every packed word (tile [BN, ...]) times its x8; u_words [1, ...]: word index."""
    MASK: tl.constexpr = ((1 << BITS) - 1) * 0x01010101 if BITS < 8 else -1
    for j in tl.static_range(P):
        xj = tl.load(xq_row + PLANE_OFF + j * PLANE_WORDS + u_words, eviction_policy="evict_last")
        codes = (words >> (BITS * j)) & MASK
        acc = _dp4a(codes, xj, acc, ASM)  # xj broadcasts over the rows
    return acc


@triton.jit
def _plane_fma(words, xp_row, u_words, acc, PLANE_OFF, PLANE_WORDS,
               BITS: tl.constexpr, E: tl.constexpr, ASM: tl.constexpr):
    """Exact path: acc + sum over the E codes of every packed word (tile [BN, ...]) times its float32 x.
    A code becomes a float with one LOP3 and one FADD: masked in place (bits SH.. of a 16-bit half) under the
    exponent of 2**(23 - SH), the float is 2**(23 - SH) + q exactly."""
    upper = words >> 16  # fields above bit 15 (the sign bits it shifts in are masked off)
    for e in tl.static_range(E):
        expo = tl.full((1, 1), (150 - (BITS * e) % 16) << 23, tl.int32)  # the field's shift within its half
        mask = tl.full((1, 1), ((1 << BITS) - 1) << ((BITS * e) % 16), tl.int32)
        if BITS * e < 16:
            f = _and_or(words, mask, expo, ASM)
        else:
            f = _and_or(upper, mask, expo, ASM)
        q = f.to(tl.float32, bitcast=True) - expo.to(tl.float32, bitcast=True)
        xe = tl.load(xp_row + PLANE_OFF + e * PLANE_WORDS + u_words, eviction_policy="evict_last")
        acc += q * xe  # xe broadcasts over the rows
    return acc


@triton.jit
def _meta_tile(s_ptr, z_ptr, rows, g, NG, VEC: tl.constexpr):
    """Raw scale/zero [BN, T] of the groups g [T]. VEC: elements per thread along T (see the kernel)."""
    meta = tl.max_contiguous(rows[:, None] * NG + g[None, :], [1, VEC])
    return tl.load(s_ptr + meta), tl.load(z_ptr + meta)


@triton.jit
def _fetch(w_ptr, s_ptr, z_ptr, rows, c0, KU, KW, NG, BITS: tl.constexpr, G: tl.constexpr, BU: tl.constexpr,
           VEC: tl.constexpr, VEC_HI: tl.constexpr):
    """Raw packed words [BN, BU] of units c0.. and their groups' raw scale/zero; 3-bit: those of the low plane
    (2 bits, 16 elements a word), then the high plane's [BN, BU/2] (1 bit, 32 elements a word). Else the high
    part repeats the low one (unused)."""
    U: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    u = c0 + tl.arange(0, BU)
    base = w_ptr + rows[:, None] * KW
    lo = tl.load(base + tl.max_contiguous(u, VEC)[None, :], eviction_policy="evict_first")
    s, z = _meta_tile(s_ptr, z_ptr, rows, u // (G // U), NG, VEC)
    if BITS == 3:
        uh = c0 // 2 + tl.arange(0, BU // 2)
        hi = tl.load(base + KU + tl.max_contiguous(uh, VEC_HI)[None, :], eviction_policy="evict_first")
        sh, zh = _meta_tile(s_ptr, z_ptr, rows, uh // (G // 32), NG, VEC_HI)
    else:
        hi, sh, zh = lo, s, z
    return lo, s, z, hi, sh, zh


@triton.jit
def _dequant_meta(raw, q_ptr, off_ptr, rows, g, c0, NB, U: tl.constexpr, G: tl.constexpr, QMETA: tl.constexpr,
                  MBLK: tl.constexpr, META_CHUNK: tl.constexpr, HIGH: tl.constexpr):
    """Scale or zero as float32 from its raw tile (quantized metadata: its code times its block's step, plus its
    offset; HIGH: the zero's nibble of 4-bit codes)."""
    v = _meta_value(raw, QMETA, HIGH)
    if QMETA:
        if META_CHUNK:  # the chunk (first unit c0) lies in one metadata block: one step/offset per row
            blk = (rows * NB + (c0 * U) // G // MBLK)[:, None]
        else:
            blk = rows[:, None] * NB + (g // MBLK)[None, :]
        v = v * tl.load(q_ptr + blk).to(tl.float32) + tl.load(off_ptr + blk).to(tl.float32)
    return v


@triton.jit
def _tile_acc(lo, s_raw, z_raw, hi, sh_raw, zh_raw, ss_ptr, so_ptr, zs_ptr, zo_ptr, rows, c0, xq_row, sx, sq, sxh,
              KU, KB, NB, BITS: tl.constexpr, G: tl.constexpr, BU: tl.constexpr, QMETA: tl.constexpr,
              MBLK: tl.constexpr, META_CHUNK: tl.constexpr, EXACT: tl.constexpr, ASM: tl.constexpr):
    """Per (row, word) of a fetched tile: s sx (sum q x8 - z sum x8), the group affine applied to every word's
    integer dot; 3-bit: the low plane's so, and the high plane's s sx sum(q_hi x8) (to be weighted by 4)."""
    U: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    u = c0 + tl.arange(0, BU)
    if EXACT:
        dot = _plane_fma(lo, xq_row, u[None, :], tl.zeros(lo.shape, tl.float32), 0, KU, 2 if BITS == 3 else BITS, U,
                         ASM)
    elif BITS == 3:
        dot = _plane_dot(lo, xq_row, u[None, :], tl.zeros(lo.shape, tl.int32), 0, KU, 2, 4, ASM).to(tl.float32)
    else:
        dot = _plane_dot(lo, xq_row, u[None, :], tl.zeros(lo.shape, tl.int32), 0, KU, BITS, U // 4, ASM).to(tl.float32)
    g = u // (G // U)
    s = _dequant_meta(s_raw, ss_ptr, so_ptr, rows, g, c0, NB, U, G, QMETA, MBLK, META_CHUNK, False)
    z = _dequant_meta(z_raw, zs_ptr, zo_ptr, rows, g, c0, NB, U, G, QMETA, MBLK, META_CHUNK, True)
    if EXACT:
        r = s * (dot - z * sq[None, :])
    else:
        r = (s * sx[None, :]) * (dot - z * sq[None, :])
    rh = r
    if BITS == 3:  # the high bit of every code: its sum over x, the zero already taken with the low plane
        uh = c0 // 2 + tl.arange(0, BU // 2)
        sh = _dequant_meta(sh_raw, ss_ptr, so_ptr, rows, uh // (G // 32), c0, NB, U, G, QMETA, MBLK,
                           META_CHUNK, False)
        if EXACT:
            dh = _plane_fma(hi, xq_row, uh[None, :], tl.zeros(hi.shape, tl.float32), 16 * KU, KB, 1, 32, ASM)
            rh = sh * dh
        else:
            dh = _plane_dot(hi, xq_row, uh[None, :], tl.zeros(hi.shape, tl.int32), 4 * KU, KB, 1, 8, ASM)
            rh = (sh * sxh[None, :]) * dh.to(tl.float32)
    return r, rh


@triton.jit
def _gemv_int8_kernel(
    xq_ptr, xw_ptr, y_ptr, ws_ptr, cnt_ptr, ids_ptr,
    w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr,
    w2_ptr, s2_ptr, ss2_ptr, so2_ptr, z2_ptr, zs2_ptr, zo2_ptr,
    M, N, KU, KB, KW, NG, NB, stride_qm, stride_wm, stride_ym, ES_W, ES_M, ES_H,
    BITS: tl.constexpr, G: tl.constexpr, QMETA: tl.constexpr, MBLK: tl.constexpr,
    BN: tl.constexpr, BU: tl.constexpr, SPLIT: tl.constexpr, GATED: tl.constexpr, GROUPED: tl.constexpr,
    CHUNKS: tl.constexpr, META_CHUNK: tl.constexpr, PREFETCH: tl.constexpr, VEC: tl.constexpr,
    VEC_HI: tl.constexpr, EXACT: tl.constexpr, ASM: tl.constexpr,
):
    """y[m, n] = sum_k x8[m, k] w[n, k] for one row m and BN rows of W; GATED, GROUPED and SPLIT as in
    ``quant_kernels._gemv_kernel``. A chunk is BU packed words (3-bit: of the low plane) of each of the BN rows.
    Layout: every load of a chunk claims runs of at most VEC (VEC_HI) elements, what a thread's share of the
    chunk's x8 [BU] is, so all of them share one layout and nothing is shuffled between threads; with BU = 4 x
    threads each thread holds all BN rows of its 4 words, so the x8 it loads serves every row.
    PREFETCH: the next chunk's weights are loaded before this chunk's arithmetic (more bytes in flight).
    KU: packed words (3-bit: of the low plane) per row of W, and units per row of x; KB: blocks of 32 per row.
    Passed, not derived from K, so that Triton sees their divisibility and vectorizes the loads they offset.
    Reference: ``F.linear(fake_quantize_reference(x), dequantize(W))``."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    if GROUPED:
        (w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr, w2_ptr, s2_ptr, ss2_ptr, so2_ptr, z2_ptr, zs2_ptr,
         zo2_ptr) = _expert_pointers(ids_ptr, pid_m, ES_W, ES_M, ES_H, w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr,
                                     zo_ptr, w2_ptr, s2_ptr, ss2_ptr, so2_ptr, z2_ptr, zs2_ptr, zo2_ptr)
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)
    xq_row = xq_ptr + pid_m * stride_qm
    xw_row = xw_ptr + pid_m * stride_wm
    acc = tl.zeros((BN, BU), tl.float32)
    acc2 = tl.zeros((BN, BU), tl.float32)
    hacc = tl.zeros((BN, BU // 2), tl.float32)  # 3-bit: the high planes'
    hacc2 = tl.zeros((BN, BU // 2), tl.float32)
    first = pid_k * CHUNKS * BU
    # With PREFETCH these hold the next chunk's raw weights (loop-carried); else they only give them a type.
    lon, sn, zn, hin, shn, zhn = _fetch(w_ptr, s_ptr, z_ptr, rows, first, KU, KW, NG, BITS, G, BU, VEC, VEC_HI)
    lo2n, s2n, z2n, hi2n, sh2n, zh2n = lon, sn, zn, hin, shn, zhn
    if GATED:
        lo2n, s2n, z2n, hi2n, sh2n, zh2n = _fetch(w2_ptr, s2_ptr, z2_ptr, rows, first, KU, KW, NG, BITS, G, BU, VEC,
                                                  VEC_HI)
    for i in range(CHUNKS):  # chunks per split: the splits divide K evenly (launch)
        c0 = first + i * BU
        if PREFETCH:
            lo, s, z, hi, sh, zh = lon, sn, zn, hin, shn, zhn
            lo2, s2, z2, hi2, sh2, zh2 = lo2n, s2n, z2n, hi2n, sh2n, zh2n
            cn = first + tl.minimum(i + 1, CHUNKS - 1) * BU  # the last re-reads itself
            lon, sn, zn, hin, shn, zhn = _fetch(w_ptr, s_ptr, z_ptr, rows, cn, KU, KW, NG, BITS, G, BU, VEC, VEC_HI)
            if GATED:
                lo2n, s2n, z2n, hi2n, sh2n, zh2n = _fetch(w2_ptr, s2_ptr, z2_ptr, rows, cn, KU, KW, NG, BITS, G, BU,
                                                          VEC, VEC_HI)
        else:
            lo, s, z, hi, sh, zh = _fetch(w_ptr, s_ptr, z_ptr, rows, c0, KU, KW, NG, BITS, G, BU, VEC, VEC_HI)
            lo2, s2, z2, hi2, sh2, zh2 = lo, s, z, hi, sh, zh
            if GATED:
                lo2, s2, z2, hi2, sh2, zh2 = _fetch(w2_ptr, s2_ptr, z2_ptr, rows, c0, KU, KW, NG, BITS, G, BU, VEC,
                                                    VEC_HI)
        u = c0 + tl.arange(0, BU)
        if EXACT:  # x itself, no steps: xw holds each unit's sum of x
            sq = tl.load(xw_row + u, eviction_policy="evict_last")
            sx = sq
        else:
            sx = tl.load(xw_row + u, eviction_policy="evict_last")
            sq = tl.load(xw_row + KU + u, eviction_policy="evict_last")
        sxh = sx
        if BITS == 3 and (not EXACT):
            sxh = tl.load(xw_row + 2 * KU + c0 // 2 + tl.arange(0, BU // 2), eviction_policy="evict_last")
        r, rh = _tile_acc(lo, s, z, hi, sh, zh, ss_ptr, so_ptr, zs_ptr, zo_ptr, rows, c0, xq_row, sx, sq, sxh, KU, KB, NB,
                          BITS, G, BU, QMETA, MBLK, META_CHUNK, EXACT, ASM)
        acc += r
        if BITS == 3:
            hacc += rh
        if GATED:
            r2, rh2 = _tile_acc(lo2, s2, z2, hi2, sh2, zh2, ss2_ptr, so2_ptr, zs2_ptr, zo2_ptr, rows, c0, xq_row, sx, sq,
                                sxh, KU, KB, NB, BITS, G, BU, QMETA, MBLK, META_CHUNK, EXACT, ASM)
            acc2 += r2
            if BITS == 3:
                hacc2 += rh2
    out = tl.sum(acc, axis=1)
    out2 = tl.sum(acc2, axis=1)
    if BITS == 3:
        out += 4.0 * tl.sum(hacc, axis=1)
        out2 += 4.0 * tl.sum(hacc2, axis=1)
    if GATED:
        out = out / (1.0 + tl.exp(-out)) * out2

    _store_rows(out, y_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, pid_m, M, N, stride_ym, BN, SPLIT)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


class Int8Config(NamedTuple):
    bn: int  # rows of W per program
    bu: int  # units (packed words; 3-bit: 32-element blocks) per loop step
    warps: int
    split: int  # programs along K
    prefetch: bool = False  # load chunk c+1's weights before chunk c's arithmetic


# (bits, group, n, k, gated) -> Int8Config; the benchmark fills this to try configs.
OVERRIDES: dict[tuple, Int8Config] = {}


# Best configs of the sweep on an H100 at Mixtral's expert shapes, by (bits, group, gated): (bn, bu, warps, prefetch)
# (benchmarks/gemv_int8.py --sweep --wide; benchmarks/results/session9/gemv_wide_h100.json). Every winner spans its
# chunk with 4 words per thread (bu = 128 x warps; 2 for 3-bit's high plane) and keeps 2-4 rows per thread.
_TUNED = {
    (2, 16, True): (2, 128, 1, False), (2, 16, False): (2, 128, 1, True),
    (2, 32, True): (4, 128, 1, False), (2, 32, False): (2, 128, 2, True),
    (3, 64, True): (2, 128, 1, True), (3, 64, False): (4, 128, 2, False),
    (4, 64, True): (2, 256, 1, False), (4, 64, False): (2, 256, 2, True),
}


# The exact path's, by the same sweep (--exact; benchmarks/results/session9/gemv_exact_h100.json).
_TUNED_EXACT = {
    (2, 16, True): (2, 128, 1, False), (2, 16, False): (2, 128, 1, False),
    (2, 32, True): (2, 128, 1, False), (2, 32, False): (2, 128, 1, True),
    (3, 64, True): (4, 256, 2, True), (3, 64, False): (4, 128, 1, False),
    (4, 64, True): (4, 256, 2, False), (4, 64, False): (4, 256, 2, True),
}


def config(bits: int, group: int, n: int, k: int, gated: bool, exact: bool = False) -> Int8Config:
    """Block configuration, from ``benchmarks/gemv_int8.py --sweep --wide`` on an H100 (Mixtral's expert shapes);
    other formats take 2 rows and 128 units on one warp. Split-K only where there are fewer programs than SMs."""
    key = (bits, group, n, k, gated) + (("exact",) if exact else ())
    if key in OVERRIDES:
        return OVERRIDES[key]
    ku = k // unit(bits)
    bn, bu, warps, prefetch = (_TUNED_EXACT if exact else _TUNED).get((bits, group, gated), (2, 128, 1, False))
    bu = min(bu, ku & -ku)  # a power of two dividing the units
    split = 1
    while triton.cdiv(n, bn) * split < _SMS and split * 2 <= 8 and (ku // bu) % (split * 2) == 0:
        split *= 2
    return Int8Config(bn, bu, warps, split, prefetch)


def _min_group(bits: int) -> int:
    return BLOCK if bits == 3 else unit(bits)  # a 3-bit high-plane word (32 elements) lies in one group


def supports(bits: int, group: int, k: int) -> bool:
    return k % BLOCK == 0 and group >= _min_group(bits)


def check(bits: int, group: int, k: int) -> None:
    u = _min_group(bits)
    if not supports(bits, group, k):
        raise MoeOffloadError(f"int8 activations need K % {BLOCK} == 0 and groups of at least {u} elements for "
                              f"{bits}-bit weights, got K={k}, group {group}")


def quantize_activations(x2: torch.Tensor, bits: int, out: Optional[tuple[torch.Tensor, torch.Tensor]] = None):
    """x2 [M, K] (unit stride along K) -> (x8 planes int32 [M, x8_words], steps and int8 sums float32 [M, xw_floats])."""
    m, k = x2.shape
    u = unit(bits)
    if out is None:
        out = (torch.empty((m, x8_words(bits, k)), device=x2.device, dtype=torch.int32),
               torch.empty((m, xw_floats(bits, k)), device=x2.device, dtype=torch.float32))
    xq, xw = out
    ch = 256
    while k % ch:  # K is a multiple of 32 (check), every plane's word holds at most 32 elements
        ch //= 2
    _quantize_kernel[(m, k // ch)](x2, x2.stride(0), xq, xw, k, xq.stride(0), xw.stride(0), BITS=bits, U=u, CH=ch,
                                   ASM=_ASM, num_warps=2)
    return xq, xw


def x_planes(x2: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact path: x2 [M, K] -> (float32 planes [M, K] (3-bit: [M, 2K]), each unit's sum of x float32 [M, K/unit])."""
    m, k = x2.shape
    u = unit(bits)
    xp = torch.empty((m, 2 * k if bits == 3 else k), device=x2.device, dtype=torch.float32)
    xw = torch.empty((m, k // u), device=x2.device, dtype=torch.float32)
    ch = 256
    while k % ch:
        ch //= 2
    _planes_kernel[(m, k // ch)](x2, x2.stride(0), xp, xw, k, xp.stride(0), xw.stride(0), BITS=bits, U=u, CH=ch,
                                 num_warps=2)
    return xp, xw


def _per_thread(elements: int, warps: int) -> int:
    """Elements per thread of a 1-D load of that many 32-bit values, as Triton lays it out (16-byte vectors at
    most, every thread busy)."""
    return max(1, min(4, elements // (32 * warps)))


def launch(x2, y2, bits, group, n, k, w1, w2=None, grouped=None, scratch=None, exact: bool = False) -> None:
    """As ``quant_kernels._launch_gemv``, with x rounded to int8 first (``scratch``: preallocated x8 buffers);
    ``exact``: x stays float (laid out in planes, no rounding), the codes become floats one by one."""
    check(bits, group, k)
    gated = w2 is not None
    xq, xw = x_planes(x2, bits) if exact else quantize_activations(x2, bits, scratch)
    if grouped is None:
        m, ids, es = x2.shape[0], x2, (0, 0, 0)
        stride_qm, stride_wm = xq.stride(0), xw.stride(0)
    else:
        ids, stride = grouped
        m = ids.numel()
        shared = x2.shape[0] == 1
        stride_qm, stride_wm = (0, 0) if shared else (xq.stride(0), xw.stride(0))
        es = (stride // 4, stride // w1[1][0].element_size(), stride // 2)
    bn, bu, warps, split, prefetch = config(bits, group, n, k, gated, exact)
    ng = k // group
    qmeta = w1[3]
    mblk = _meta_block(ng) if qmeta else 1
    n_chunks = k // unit(bits) // bu
    if (k // unit(bits)) % bu or n_chunks % split:
        raise MoeOffloadError(f"int8 GEMV config {bu} units x {split} splits does not divide K={k}")
    per_split = n_chunks // split
    grid = (triton.cdiv(n, bn), split, m)
    if split > 1:
        ws, cnt = _split_scratch(x2.device, split * m * n, grid[0] * m)
    else:
        ws, cnt = y2, y2
    packed, (s, ss, so), (z, zs, zo), _ = w1
    packed2, (s2, ss2, so2), (z2, zs2, zo2), _ = w2 if gated else w1
    _gemv_int8_kernel[grid](
        xq, xw, y2, ws, cnt, ids, packed, s, ss, so, z, zs, zo, packed2, s2, ss2, so2, z2, zs2, zo2,
        m, n, k // unit(bits), k // BLOCK, k * bits // 32, ng, ng // mblk, stride_qm, stride_wm, y2.stride(0), *es,
        BITS=bits, G=group, QMETA=qmeta, MBLK=mblk, BN=bn, BU=bu, SPLIT=split, GATED=gated,
        GROUPED=grouped is not None, CHUNKS=per_split, PREFETCH=prefetch,
        META_CHUNK=qmeta and (group * mblk) % (bu * unit(bits)) == 0, VEC=_per_thread(bu, warps),
        VEC_HI=_per_thread(bu // 2, warps), EXACT=exact, ASM=_ASM, num_warps=warps, num_stages=1,
    )
