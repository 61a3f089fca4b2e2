"""Triton kernels: y = x @ dequantize(W).T with the dequantization fused into the product.

Every kernel here computes what ``moe_offload.quant.linear.reference_matmul`` computes, i.e.
``F.linear(x, moe_offload.quant.hqq.dequantize(qt, x.dtype))``, reading the packed weights of
:mod:`moe_offload.quant.pack` and the metadata of :mod:`moe_offload.quant.hqq` directly:

* GEMV (decode, M <= ``GEMV_MAX_M``): CUDA-core dot products with fp32 accumulation, one pass over
  the packed weights. Codes become floats with the exponent trick: the field, masked in place, is
  OR-ed into the bits of 2**e and 2**e subtracted (one LOP3 + one FADD per weight; int->float
  conversion runs at 1/8 rate). The group affine is applied per packed word,
  ``sum_k s (q_k - z) x_k = s (sum_k q_k x_k - z sum_k x_k)``. gate+up of an expert can run as one
  GATED launch (silu(a) * b in the epilogue). Split-K (used when there are fewer programs than
  SMs) reduces in the same launch: each split writes fp32 partials and the last program of a tile
  to arrive (an acq_rel counter) sums them in split order, deterministic, no zero-fill or 2nd kernel.
  On an H100 it reads 1.1-1.35 TB/s (about 40% of a device copy) on Mixtral's big matrices; the
  limit is instruction issue plus L1/shared-memory traffic (x is re-distributed to every thread
  through shared memory), not DRAM; see benchmarks/kernels.py.
* GEMM (``GEMV_MAX_M`` < M < ``DEQUANT_MIN_M``): tiles dequantized in registers to the activation
  dtype (exactly the reference's rounding) and fed to ``tl.dot`` (tensor cores, fp32 accumulation).
* M >= ``DEQUANT_MIN_M`` (prefill): one Triton pass writes the dequantized weight to a scratch
  buffer and cuBLAS does the product. Measured faster than the fused GEMM from 128-256 rows (2- and
  3-bit: from 16, where the fused GEMM is slow), and within 5-9% of a plain bf16 cuBLAS GEMM at 4096 rows.

All launches are CUDA-graph capturable: no host syncs, and no allocation when ``out`` is given
(split-K uses a per-device scratch buffer that is allocated on first use, so run once before
capturing). An eager call costs ~60-100 us of host time (Python + Triton launcher) against ~20 us
of GPU time for a 14336x4096 matrix, so decode should replay CUDA graphs.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..errors import MoeOffloadError
from ..quant.hqq import QuantizedMeta, QuantizedTensor, meta_block

Meta = Union[torch.Tensor, QuantizedMeta]

_ASM = os.environ.get("TRITON_INTERPRET", "0") != "1"  # the interpreter runs no inline PTX
# Path by rows of x (M), from benchmarks/kernels.py on H100 for a 14336x4096 matrix: the GEMV costs
# about M times its M=1 time (it re-decodes the weights per row; 2-bit 20 us, 3/4-bit ~29 us); the
# tiled GEMM is flat at ~85-135 us up to 64 rows; dequantize + cuBLAS costs one dequantization
# (~60 us) plus a bf16 GEMM and wins from somewhere in 64..256 rows (128 is not measured). 3-bit dequantizes
# from 16 rows like 2-bit: Mixtral 4/3 prefill went 598 -> 1126 tok/s (BENCHMARKS.md, session 4).
GEMV_MAX_M = {2: 8, 3: 3, 4: 3, 8: 3}
DEQUANT_MIN_M = {2: 16, 3: 16, 4: 128, 8: 128}
_SMS = 132  # an H100's SMs: below this many programs the GEMV splits K

# (bits, group, n, k, gated) -> GemvConfig; the benchmark fills this to try configs.
GEMV_OVERRIDES: dict[tuple, "GemvConfig"] = {}


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _codes(w, BITS: tl.constexpr):
    """int32 words [R, C] of 2/4/8-bit codes -> float32 codes [R, C * 32 // BITS], exact, in K order."""
    R: tl.constexpr = w.shape[0]
    C: tl.constexpr = w.shape[1]
    HALF: tl.constexpr = 16 // BITS  # codes per 16-bit half word
    # Split each word into halves so every field sits below bit 16, inside a float32 mantissa.
    # The arithmetic shift's sign bits land above bit 15 and are masked off below.
    h = tl.join(w, w >> 16)  # [R, C, 2]
    j = tl.arange(0, HALF)
    mask = ((1 << BITS) - 1) << (BITS * j)
    # bits(2**(23 - BITS*j)) | (q << BITS*j) is the float 2**(23 - BITS*j) + q: subtract to get q.
    expo = (150 - BITS * j) << 23
    f = ((h[:, :, :, None] & mask) | expo).to(tl.float32, bitcast=True) - expo.to(tl.float32, bitcast=True)
    return tl.reshape(f, (R, C * 2 * HALF))


@triton.jit
def _codes3(lo, hi):
    """3-bit planes -> float32 codes [R, 32 C]: lo [R, 2C] low-2-bit words, hi [R, C] high-bit words."""
    R: tl.constexpr = hi.shape[0]
    C: tl.constexpr = hi.shape[1]
    lo = tl.reshape(lo, (R, C, 2))  # low word h of block c: elements 32c + 16h + [0, 16)
    lo = tl.join(lo, lo >> 16)  # [R, C, 2, 2]: half h2 holds elements 32c + 16h + 8h2 + [0, 8)
    hi = tl.join(hi, hi >> 16)  # [R, C, 2]: half h holds the high bits of elements 32c + 16h + [0, 16)
    j = tl.arange(0, 8)
    lo_mask = 3 << (2 * j)
    lo_expo = (150 - 2 * j) << 23  # 2**(23-2j) + q_lo
    b = 8 * tl.arange(0, 2)[:, None] + j[None, :]  # [2, 8]: bit of the high plane within the half
    hi_mask = 1 << b
    hi_expo = (152 - b) << 23  # 2**(25-b): a set bit b adds 2**(25-b) * 2**(b-23) = 4
    flo = ((lo[:, :, :, :, None] & lo_mask) | lo_expo).to(tl.float32, bitcast=True)
    fhi = ((hi[:, :, :, None, None] & hi_mask) | hi_expo).to(tl.float32, bitcast=True)
    # Exact: both offsets are powers of two, every intermediate is an integer below 2**24.
    off = hi_expo.to(tl.float32, bitcast=True) + lo_expo.to(tl.float32, bitcast=True)
    q = (fhi - off) + flo
    return tl.reshape(q, (R, 32 * C))


@triton.jit
def _load_codes(w_ptr, rows, c, KW, K16, BITS: tl.constexpr, BK: tl.constexpr):
    """Codes of chunk c (elements [c*BK, (c+1)*BK)) of the given rows -> float32 [BN, BK]."""
    base = w_ptr + rows[:, None] * KW
    if BITS == 3:
        lo = tl.load(base + c * (BK // 16) + tl.arange(0, BK // 16)[None, :], eviction_policy="evict_first")
        hi = tl.load(base + K16 + c * (BK // 32) + tl.arange(0, BK // 32)[None, :], eviction_policy="evict_first")
        q = _codes3(lo, hi)
    else:
        BKW: tl.constexpr = BK * BITS // 32
        w = tl.load(base + c * BKW + tl.arange(0, BKW)[None, :], eviction_policy="evict_first")
        q = _codes(w, BITS)
    return q


@triton.jit
def _meta_value(raw, QMETA: tl.constexpr, HIGH: tl.constexpr):
    """A loaded scale or zero element as float32: float16 as is, or its code (QMETA: code bits; 4-bit codes share
    a byte, the scale's in the low nibble, HIGH=False, the zero's in the high one)."""
    if QMETA == 4:
        if HIGH:
            raw = raw >> 4
        else:
            raw = raw & 15
    return raw.to(tl.float32)


@triton.jit
def _load_meta(p_ptr, step_ptr, off_ptr, rows, g, NG, NB, QMETA: tl.constexpr, MBLK: tl.constexpr,
               HIGH: tl.constexpr):
    """Scale or zero of the given rows and groups -> float32 [BN, NGC] (float16, or codes + step/offset)."""
    v = _meta_value(tl.load(p_ptr + rows[:, None] * NG + g[None, :]), QMETA, HIGH)
    if QMETA:
        b = g // MBLK
        step = tl.load(step_ptr + rows[:, None] * NB + b[None, :]).to(tl.float32)
        off = tl.load(off_ptr + rows[:, None] * NB + b[None, :]).to(tl.float32)
        v = v * step + off
    return v


@triton.jit
def _and_or(a, mask, expo, ASM: tl.constexpr):
    """(a & mask) | expo. ptxas does not fuse an AND and an OR of two constants into one LOP3; PTX does."""
    if ASM:
        r = tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r", [a, mask, expo], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        r = (a & mask) | expo
    return r


@triton.jit
def _fields(src, BITS: tl.constexpr, HALF: tl.constexpr, ASM: tl.constexpr):
    """The HALF BITS-wide codes in the low 16 bits of src [BN, W, 1] -> exact float32 [BN, W, HALF].

    Field j is masked in place (no shift) and given the exponent of 2**(23 - BITS*j), so the float
    is 2**(23 - BITS*j) + q: one LOP3 and one FADD per code.
    """
    j = tl.arange(0, HALF)[None, None, :]
    expo = (150 - BITS * j) << 23
    f = _and_or(src, ((1 << BITS) - 1) << (BITS * j), expo, ASM).to(tl.float32, bitcast=True)
    return f - expo.to(tl.float32, bitcast=True)


@triton.jit
def _fields3(lo, hi, ASM: tl.constexpr):
    """3-bit codes of 8 consecutive elements: lo [BN, W, 1] holds their 2-bit fields in bits 0..15,
    hi [BN, W, 1] their high bits in bits 0..7 -> exact float32 [BN, W, 8]."""
    j = tl.arange(0, 8)[None, None, :]
    lo_expo = (150 - 2 * j) << 23  # 2**(23-2j) + q_lo
    hi_expo = (152 - j) << 23  # 2**(25-j), plus 4 when high bit j is set
    flo = _and_or(lo, 3 << (2 * j), lo_expo, ASM).to(tl.float32, bitcast=True)
    fhi = _and_or(hi, 1 << j, hi_expo, ASM).to(tl.float32, bitcast=True)
    # Exact: the offsets are powers of two and every intermediate is an integer below 2**24.
    off = hi_expo.to(tl.float32, bitcast=True) + lo_expo.to(tl.float32, bitcast=True)
    return (fhi - off) + flo


@triton.jit
def _fetch_x(x_ptr, c, pred, BITS: tl.constexpr, BK: tl.constexpr):
    """Raw chunk c of one activation row as the two halves of every low-plane word: [words, HALF] each."""
    UNIT: tl.constexpr = 16 if BITS == 3 else 32 // BITS  # elements per low-plane word
    HALF: tl.constexpr = UNIT // 2
    wi = c * (BK // UNIT) + tl.arange(0, BK // UNIT)
    xp = x_ptr + wi[:, None] * UNIT + tl.arange(0, HALF)[None, :]
    return tl.load(xp, mask=pred, eviction_policy="evict_last"), tl.load(xp + HALF, mask=pred, eviction_policy="evict_last")


@triton.jit
def _fetch_w(w_ptr, s_ptr, z_ptr, rows, c, pred, KW, K16, NG, WSTRIDE,
             BITS: tl.constexpr, G: tl.constexpr, BK: tl.constexpr, ONE_WORD: tl.constexpr):
    """Raw packed words [BN, words, 1] (3-bit: low plane and matching high-plane word) and the raw
    scale/zero of every word's group [BN, words] for chunk c.

    ONE_WORD (a sweep knob, slower on H100): index with WSTRIDE, the word stride along K (always 1),
    passed unspecialized on purpose, so the compiler cannot prove the words contiguous and gives each
    thread one word per row (32-bit loads, still coalesced) instead of four 16-byte-vector words.
    Meant to shrink each thread's share of x, which reaches every thread through shared memory.
    """
    UNIT: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    BKW: tl.constexpr = BK * BITS // 32 if BITS != 3 else BK // 16
    wi = c * BKW + tl.arange(0, BKW)
    if ONE_WORD:
        wi = wi * WSTRIDE
    base = w_ptr + rows[:, None, None] * KW
    lo = tl.load(base + wi[None, :, None], mask=pred, eviction_policy="evict_first")
    if BITS == 3:
        # High-plane word wi//2 holds this word's 16 high bits in its half wi%2.
        hi = tl.load(base + K16 + (wi // 2)[None, :, None], mask=pred, eviction_policy="evict_first")
    else:
        hi = lo
    # A word lies inside one group (G >= UNIT, checked on the host): its group's metadata is re-read
    # for each word, from L1.
    meta = rows[:, None] * NG + ((wi * UNIT) // G)[None, :]
    return lo, hi, tl.load(s_ptr + meta, mask=pred), tl.load(z_ptr + meta, mask=pred)


@triton.jit
def _word_acc(lo, hi, s_raw, z_raw, x0, x1, xs, c, rows, ss_ptr, so_ptr, zs_ptr, zo_ptr, NB,
              BITS: tl.constexpr, G: tl.constexpr, BK: tl.constexpr, QMETA: tl.constexpr, MBLK: tl.constexpr,
              ASM: tl.constexpr):
    """s * (sum_k q x - z * sum_k x) for every (row, low-plane word) of a fetched chunk: [BN, words]."""
    if BITS == 3:
        wi = c * (BK // 16) + tl.arange(0, BK // 16)
        hi = hi >> ((wi & 1) * 16)[None, :, None]
        d = tl.sum(_fields3(lo, hi, ASM) * x0[None, :, :].to(tl.float32), axis=2)
        d += tl.sum(_fields3(lo >> 16, hi >> 8, ASM) * x1[None, :, :].to(tl.float32), axis=2)
    else:
        # Fields above bit 15 come from the upper half (the arithmetic shift's sign bits are masked off).
        d = tl.sum(_fields(lo, BITS, 16 // BITS, ASM) * x0[None, :, :].to(tl.float32), axis=2)
        d += tl.sum(_fields(lo >> 16, BITS, 16 // BITS, ASM) * x1[None, :, :].to(tl.float32), axis=2)
    s = _meta_value(s_raw, QMETA, False)
    z = _meta_value(z_raw, QMETA, True)
    if QMETA:
        UNIT: tl.constexpr = 16 if BITS == 3 else 32 // BITS
        b = ((c * (BK // UNIT) + tl.arange(0, BK // UNIT)) * UNIT) // G // MBLK
        blk = rows[:, None] * NB + b[None, :]
        s = s * tl.load(ss_ptr + blk).to(tl.float32) + tl.load(so_ptr + blk).to(tl.float32)
        z = z * tl.load(zs_ptr + blk).to(tl.float32) + tl.load(zo_ptr + blk).to(tl.float32)
    return s * (d - z * xs[None, :])


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["WSTRIDE"])
def _gemv_kernel(
    x_ptr, y_ptr, ws_ptr, cnt_ptr, ids_ptr,
    w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr,
    w2_ptr, s2_ptr, ss2_ptr, so2_ptr, z2_ptr, zs2_ptr, zo2_ptr,
    M, N, KW, K16, NG, NB, n_chunks, chunks_per_split, stride_xm, stride_ym, WSTRIDE, ES_W, ES_M, ES_H,
    BITS: tl.constexpr, G: tl.constexpr, QMETA: tl.constexpr, MBLK: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, GATED: tl.constexpr, PREFETCH: tl.constexpr,
    ONE_WORD: tl.constexpr, ASM: tl.constexpr, GROUPED: tl.constexpr, X16: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * w[n, k] for one row m of x and BN rows of W (decode).

    Reference: ``F.linear(x, moe_offload.quant.hqq.dequantize(qt, torch.float32))`` cast to x's dtype.
    GATED: w2 is a second matrix of the same shape and y = silu(x @ w.T) * (x @ w2.T) (SPLIT == 1).
    GROUPED: row m multiplies the weights of expert ``ids[m]`` of a stack of identically laid-out experts
    (expert j's tensors lie j * ES_* elements after the given ones: ES_W int32 words, ES_M elements of
    the scale/zero tensors, ES_H float16 elements of quantized metadata's step/offset). The routing is
    read on the device, so a decode step needs no host sync to pick experts.
    Every per-weight value lives in a [BN, words, codes] tile in the layout of the packed-word load,
    so the compiler inserts no layout conversion on them (only on x).
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    if GROUPED:
        (w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr, w2_ptr, s2_ptr, ss2_ptr, so2_ptr, z2_ptr, zs2_ptr,
         zo2_ptr) = _expert_pointers(ids_ptr, pid_m, ES_W, ES_M, ES_H, w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr,
                                     zo_ptr, w2_ptr, s2_ptr, ss2_ptr, so2_ptr, z2_ptr, zs2_ptr, zo2_ptr)
    UNIT: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    # Clamp instead of masking: out-of-range rows re-read row N-1 and are dropped at the store.
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros((BN, BK // UNIT), tl.float32)
    acc2 = tl.zeros((BN, BK // UNIT), tl.float32)
    c0 = pid_k * chunks_per_split
    c1 = tl.minimum(c0 + chunks_per_split, n_chunks)
    # PREFETCH: global loads run one chunk ahead of the arithmetic (Triton does not pipeline loads
    # that feed no dot); costs registers, so it is a tuning knob.
    first = c0 < c1
    if not PREFETCH:
        first = c0 < 0  # nothing: these tensors only give the loop-carried values a type
    x0n, x1n = _fetch_x(x_row, c0, first, BITS, BK)
    lon, hin, sn, zn = _fetch_w(w_ptr, s_ptr, z_ptr, rows, c0, first, KW, K16, NG, WSTRIDE, BITS, G, BK, ONE_WORD)
    if GATED:
        lo2n, hi2n, s2n, z2n = _fetch_w(w2_ptr, s2_ptr, z2_ptr, rows, c0, first, KW, K16, NG, WSTRIDE, BITS, G, BK, ONE_WORD)
    else:
        lo2n, hi2n, s2n, z2n = lon, hin, sn, zn
    for c in range(c0, c1):
        if PREFETCH:
            x0, x1, lo, hi, s, z = x0n, x1n, lon, hin, sn, zn
            lo2, hi2, s2, z2 = lo2n, hi2n, s2n, z2n
            more = c + 1 < c1
            x0n, x1n = _fetch_x(x_row, c + 1, more, BITS, BK)
            lon, hin, sn, zn = _fetch_w(w_ptr, s_ptr, z_ptr, rows, c + 1, more, KW, K16, NG, WSTRIDE, BITS, G, BK, ONE_WORD)
            if GATED:
                lo2n, hi2n, s2n, z2n = _fetch_w(w2_ptr, s2_ptr, z2_ptr, rows, c + 1, more, KW, K16, NG, WSTRIDE, BITS, G, BK, ONE_WORD)
        else:
            x0, x1 = _fetch_x(x_row, c, True, BITS, BK)
            lo, hi, s, z = _fetch_w(w_ptr, s_ptr, z_ptr, rows, c, True, KW, K16, NG, WSTRIDE, BITS, G, BK, ONE_WORD)
            lo2, hi2, s2, z2 = lo, hi, s, z
            if GATED:
                lo2, hi2, s2, z2 = _fetch_w(w2_ptr, s2_ptr, z2_ptr, rows, c, True, KW, K16, NG, WSTRIDE, BITS, G, BK, ONE_WORD)
        if X16:
            # x reaches every thread's rows through shared memory: send it at 16 bits, widen it after.
            xs = tl.sum(x0.to(tl.float32), axis=1) + tl.sum(x1.to(tl.float32), axis=1)
        else:
            x0 = x0.to(tl.float32)
            x1 = x1.to(tl.float32)
            xs = tl.sum(x0, axis=1) + tl.sum(x1, axis=1)
        acc += _word_acc(lo, hi, s, z, x0, x1, xs, c, rows, ss_ptr, so_ptr, zs_ptr, zo_ptr, NB,
                         BITS, G, BK, QMETA, MBLK, ASM)
        if GATED:
            acc2 += _word_acc(lo2, hi2, s2, z2, x0, x1, xs, c, rows, ss2_ptr, so2_ptr, zs2_ptr, zo2_ptr, NB,
                              BITS, G, BK, QMETA, MBLK, ASM)
    out = tl.sum(acc, axis=1)  # [BN]
    if GATED:
        out = out / (1.0 + tl.exp(-out)) * tl.sum(acc2, axis=1)

    _store_rows(out, y_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, pid_m, M, N, stride_ym, BN, SPLIT)


@triton.jit
def _store_rows(out, y_ptr, ws_ptr, cnt_ptr, pid_n, pid_k, pid_m, M, N, stride_ym, BN: tl.constexpr, SPLIT: tl.constexpr):
    """A GEMV program's BN fp32 outputs of row pid_m -> y. With split-K, partials go to ws[SPLIT, M, N] and the
    last program of the tile to arrive (an acq_rel counter) sums them in split order: deterministic."""
    offs_n = pid_n * BN + tl.arange(0, BN)
    omask = offs_n < N
    y_ptrs = y_ptr + pid_m * stride_ym + offs_n
    if SPLIT == 1:
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=omask)
    else:
        ws_ptrs = ws_ptr + pid_m * N + offs_n
        tl.store(ws_ptrs + pid_k * M * N, out, mask=omask)
        tl.debug_barrier()  # every thread's partial is issued before the (one-thread) release below
        tile = pid_m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            total = tl.zeros((BN,), tl.float32)
            for s in tl.static_range(SPLIT):
                total += tl.load(ws_ptrs + s * M * N, mask=omask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=omask)
            tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch (and graph replay)


@triton.jit
def _expert_pointers(ids_ptr, pid_m, ES_W, ES_M, ES_H, w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr,
                     w2_ptr, s2_ptr, ss2_ptr, so2_ptr, z2_ptr, zs2_ptr, zo2_ptr):
    """GROUPED: row pid_m's expert ids[pid_m] lies that many strides after expert 0 in every tensor (ES_W int32
    words, ES_M scale/zero elements, ES_H float16 elements of quantized metadata's step/offset)."""
    e = tl.load(ids_ptr + pid_m).to(tl.int64)
    return (w_ptr + e * ES_W, s_ptr + e * ES_M, ss_ptr + e * ES_H, so_ptr + e * ES_H, z_ptr + e * ES_M,
            zs_ptr + e * ES_H, zo_ptr + e * ES_H, w2_ptr + e * ES_W, s2_ptr + e * ES_M, ss2_ptr + e * ES_H,
            so2_ptr + e * ES_H, z2_ptr + e * ES_M, zs2_ptr + e * ES_H, zo2_ptr + e * ES_H)


@triton.jit
def _gemm_kernel(
    x_ptr, y_ptr, w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr,
    M, N, KW, K16, NG, NB, n_chunks, stride_xm, stride_ym,
    BITS: tl.constexpr, G: tl.constexpr, QMETA: tl.constexpr, MBLK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = x @ dequantize(W).T for larger M: tiles dequantized to x's dtype in registers, then tl.dot.

    Reference: ``F.linear(x, moe_offload.quant.hqq.dequantize(qt, x.dtype))`` (same weight rounding).
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    # Grouped order: programs running together share weight tiles in L2.
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    NGC: tl.constexpr = BK // G
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)
    ms = tl.minimum(pid_m * BM + tl.arange(0, BM), M - 1)
    acc = tl.zeros((BM, BN), tl.float32)
    for c in range(n_chunks):
        x = tl.load(x_ptr + ms[:, None] * stride_xm + c * BK + tl.arange(0, BK)[None, :])
        q = tl.reshape(_load_codes(w_ptr, rows, c, KW, K16, BITS, BK), (BN, NGC, G))
        g = c * NGC + tl.arange(0, NGC)
        s = _load_meta(s_ptr, ss_ptr, so_ptr, rows, g, NG, NB, QMETA, MBLK, False)
        z = _load_meta(z_ptr, zs_ptr, zo_ptr, rows, g, NG, NB, QMETA, MBLK, True)
        w = tl.reshape((q - z[:, :, None]) * s[:, :, None], (BN, BK)).to(x.dtype)
        acc = tl.dot(x, tl.trans(w), acc)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    omask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _dequant_kernel(
    out_ptr, w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr, N, K, KW, K16, NG, NB,
    BITS: tl.constexpr, G: tl.constexpr, QMETA: tl.constexpr, MBLK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """out[N, K] = dequantize(W) in out's dtype. Reference: ``moe_offload.quant.hqq.dequantize(qt, dtype)``."""
    pid_n = tl.program_id(0)
    c = tl.program_id(1)
    NGC: tl.constexpr = BK // G
    rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)
    q = tl.reshape(_load_codes(w_ptr, rows, c, KW, K16, BITS, BK), (BN, NGC, G))
    g = c * NGC + tl.arange(0, NGC)
    s = _load_meta(s_ptr, ss_ptr, so_ptr, rows, g, NG, NB, QMETA, MBLK, False)
    z = _load_meta(z_ptr, zs_ptr, zo_ptr, rows, g, NG, NB, QMETA, MBLK, True)
    w = tl.reshape((q - z[:, :, None]) * s[:, :, None], (BN, BK))
    offs_n = pid_n * BN + tl.arange(0, BN)
    ptrs = out_ptr + offs_n[:, None] * K + c * BK + tl.arange(0, BK)[None, :]
    tl.store(ptrs, w.to(out_ptr.dtype.element_ty), mask=offs_n[:, None] < N)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _pick_bk(k: int, group: int, target: int) -> int:
    """Largest power-of-two chunk <= target that divides K and holds whole groups and whole words."""
    bk = max(_next_pow2(target), group, 32)
    while k % bk:
        bk //= 2
    return bk  # K is a multiple of max(G, 32), so this stops there at the latest


class GemvConfig(NamedTuple):
    bn: int  # rows of W per program
    bk: int  # elements of K per loop step
    warps: int
    split: int  # programs along K (reduced in-kernel by the last to arrive)
    # Knobs kept for the sweep; on H100 none beat the defaults (prefetch: +5-15% time from the extra
    # registers; maxnreg=128: spills; one_word: slower except ~1% on 3-bit gated).
    prefetch: bool = False  # load chunk c+1 while computing chunk c
    maxnreg: Optional[int] = None  # register cap (occupancy vs spills)
    one_word: bool = False  # one packed word per thread and row (see _fetch_w) instead of 16-byte vectors
    x16: bool = False  # redistribute x at 16 bits (widened to float32 after the shared-memory exchange)


def _gemv_config(bits: int, group: int, n: int, k: int, gated: bool) -> GemvConfig:
    """Block configuration for the GEMV, from ``benchmarks/kernels.py --sweep`` on an H100.

    Small tiles and many programs won: 4 or 8 rows of W per program, 128 (gated: 64) packed words
    per row per chunk read as 16-byte vectors, so each thread holds 1-2 rows x 4 words. Split-K
    only pays when there are fewer programs than SMs.
    """
    key = (bits, group, n, k, gated)
    if key in GEMV_OVERRIDES:
        return GEMV_OVERRIDES[key]
    unit = 16 if bits == 3 else 32 // bits
    # x16 (x through shared memory at 16 bits; bit-identical) measured +7% / +3% on 2-bit g16 gate+up / down and
    # nothing elsewhere (benchmarks/results/kernels_ab_h100.json).
    x16 = bits == 2 and group == 16
    if gated:
        return GemvConfig(4, _pick_bk(k, group, 64 * unit), 2, 1, one_word=False, x16=x16)
    bn = 8 if (bits == 2 and n > 1024) or (bits == 4 and k > n >= 4096) else 4
    bk = _pick_bk(k, group, 128 * unit)
    split = 1
    while triton.cdiv(n, bn) * split < _SMS and split * 2 <= min(k // bk, 8):
        split *= 2
    return GemvConfig(bn, bk, 4, split, one_word=False, x16=x16)


@functools.lru_cache(maxsize=None)
def _meta_block(ng: int) -> int:
    return meta_block(ng)


_scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_scratch(device: torch.device, ws_numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-device fp32 partials buffer and zeroed arrival counters for split-K (grown on demand).

    Shared by every launch on the device: split-K launches must not run concurrently on two streams.
    """
    ws, cnt = _scratch.get(device, (None, None))
    if ws is None or ws.numel() < ws_numel or cnt.numel() < tiles:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise MoeOffloadError("split-K scratch must be allocated before CUDA graph capture: run the call once first")
        ws_numel = max(ws_numel, 0 if ws is None else ws.numel())
        tiles = max(tiles, 0 if cnt is None else cnt.numel())
        ws = torch.empty(ws_numel, device=device, dtype=torch.float32)
        cnt = torch.zeros(tiles, device=device, dtype=torch.int32)
        _scratch[device] = (ws, cnt)
    return ws, cnt


def _meta_args(meta: Meta, name: str, n: int, ng: int, quant_meta: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, step, offset) pointers for the kernels; plain float16 metadata repeats the values."""
    if isinstance(meta, QuantizedMeta):
        if not quant_meta:
            raise MoeOffloadError(f"{name}: mixing quantized and plain metadata is not supported")
        if meta.q.dtype != torch.uint8 or tuple(meta.q.shape) != (n, ng) or not meta.q.is_contiguous():
            raise MoeOffloadError(f"{name}_q must be contiguous uint8 [{n}, {ng}], got {meta.q.dtype} {tuple(meta.q.shape)}")
        nb = ng // _meta_block(ng)
        for t, part in ((meta.step, "step"), (meta.offset, "offset")):
            if t.dtype != torch.float16 or tuple(t.shape) != (n, nb) or not t.is_contiguous():
                raise MoeOffloadError(f"{name}_{part} must be contiguous float16 [{n}, {nb}], got {t.dtype} {tuple(t.shape)}")
        return meta.q, meta.step, meta.offset
    if quant_meta:
        raise MoeOffloadError(f"{name}: mixing quantized and plain metadata is not supported")
    if meta.dtype != torch.float16 or tuple(meta.shape) != (n, ng) or not meta.is_contiguous():
        raise MoeOffloadError(f"{name} must be contiguous float16 [{n}, {ng}], got {meta.dtype} {tuple(meta.shape)}")
    return meta, meta, meta


def _check_weight(x: torch.Tensor, packed: torch.Tensor, bits: int, group_size: int, n: int, k: int) -> None:
    if bits not in (2, 3, 4, 8):
        raise MoeOffloadError(f"quant_matmul supports bits 2, 3, 4 and 8, got {bits}")
    if k % 32:
        raise MoeOffloadError(f"quant_matmul needs K % 32 == 0, got K={k}")
    if group_size < 8 or group_size & (group_size - 1) or k % group_size:
        raise MoeOffloadError(f"group_size={group_size} must be a power of two >= 8 dividing K={k}")
    if x.shape[-1] != k:
        raise MoeOffloadError(f"x has {x.shape[-1]} features, the weight expects K={k}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise MoeOffloadError(f"quant_matmul takes bfloat16 or float16 activations, got {x.dtype}")
    if (not x.is_cuda and _ASM) or packed.device != x.device:  # the interpreter (tests) runs on CPU tensors
        raise MoeOffloadError(f"quant_matmul needs x and the weights on one CUDA device, got {x.device} and {packed.device}")
    words = k * bits // 32
    if packed.dtype != torch.int32 or tuple(packed.shape) != (n, words) or not packed.is_contiguous():
        raise MoeOffloadError(f"packed weight must be contiguous int32 [{n}, {words}], got {packed.dtype} {tuple(packed.shape)}")


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _out(x: torch.Tensor, n: int, m: int, out: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (*x.shape[:-1], n)
    if out is None:
        out = torch.empty(shape, device=x.device, dtype=x.dtype)
    elif tuple(out.shape) != shape or out.dtype != x.dtype or not out.is_contiguous():
        raise MoeOffloadError(f"out must be a contiguous {x.dtype} tensor of shape {list(shape)}, got {out.dtype} {list(out.shape)}")
    return out, out.view(m, n)


def _gemv_ok(bits: int, group: int) -> bool:
    """The GEMV needs every low-plane word inside one group."""
    return group >= (16 if bits == 3 else 32 // bits)


def _launch_gemv(x2, y2, bits, group, n, k, w1, w2=None, grouped=None) -> None:
    """w1/w2: (packed, (s, ss, so), (z, zs, zo), QMETA) tuples (see _weight). w2 given: gated (silu(w1) * w2).

    grouped: (ids, expert_stride_bytes): row m of y uses expert ids[m] of the stack whose first expert
    w1/w2 are; x2 may then be a single row shared by every expert (stride 0)."""
    gated = w2 is not None
    if grouped is None:
        m, stride_xm, ids, es = x2.shape[0], x2.stride(0), x2, (0, 0, 0)
    else:
        ids, stride = grouped
        m = ids.numel()
        stride_xm = 0 if x2.shape[0] == 1 else x2.stride(0)
        meta_item = w1[1][0].element_size()
        es = (stride // 4, stride // meta_item, stride // 2)
    bn, bk, warps, split, prefetch, maxnreg, one_word, x16 = _gemv_config(bits, group, n, k, gated)
    ng = k // group
    qmeta = w1[3]
    mblk = _meta_block(ng) if qmeta else 1
    n_chunks = k // bk
    per_split = triton.cdiv(n_chunks, split)
    grid = (triton.cdiv(n, bn), split, m)
    if split > 1:
        ws, cnt = _split_scratch(x2.device, split * m * n, grid[0] * m)
    else:
        ws, cnt = y2, y2  # unused
    packed, (s, ss, so), (z, zs, zo), _ = w1
    packed2, (s2, ss2, so2), (z2, zs2, zo2), _ = w2 if gated else w1
    _gemv_kernel[grid](
        x2, y2, ws, cnt, ids, packed, s, ss, so, z, zs, zo, packed2, s2, ss2, so2, z2, zs2, zo2,
        m, n, k * bits // 32, k // 16, ng, ng // mblk, n_chunks, per_split, stride_xm, y2.stride(0), 1, *es,
        BITS=bits, G=group, QMETA=qmeta, MBLK=mblk, BN=bn, BK=bk, SPLIT=split, GATED=gated, PREFETCH=prefetch,
        ONE_WORD=one_word, ASM=_ASM, GROUPED=grouped is not None, X16=x16, num_warps=warps, num_stages=1,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )


# (bits, group) formats whose exact GEMV runs on the planes kernel (``gemv_int8.launch(exact=True)``: x as float32
# planes, rows held per thread) instead of ``_gemv_kernel``: those where it measured faster on an H100 (BENCHMARKS.md,
# session 9: a whole 4/2 expert 46.3 against 62.7 µs, 4-bit g64 54.7 against 64.3). 3-bit measured slower (91 against
# 71 µs: its high plane costs a float per bit), so it keeps the other kernel.
PLANES_EXACT: set[tuple[int, int]] = {(2, 16), (2, 32), (4, 64)}


def _gemv(x2, y2, bits, group, n, k, w1, w2=None, grouped=None, int8: bool = False) -> None:
    """The exact GEMV, or with int8 activations where asked for and the shape allows (else exact)."""
    if int8 or (bits, group) in PLANES_EXACT:
        from . import gemv_int8

        if gemv_int8.supports(bits, group, k):
            return gemv_int8.launch(x2, y2, bits, group, n, k, w1, w2, grouped, exact=not int8)
    _launch_gemv(x2, y2, bits, group, n, k, w1, w2, grouped)


def _launch_gemm(x2, y2, bits, group, n, k, w1) -> None:
    m = x2.shape[0]
    packed, (s, ss, so), (z, zs, zo), qmeta = w1
    ng = k // group
    mblk = _meta_block(ng) if qmeta else 1
    bm = min(max(16, _next_pow2(m)), 128)  # 16: mma.sync tiles for small M; >= 64: wgmma
    bn, bk = 128, _pick_bk(k, group, 64)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gemm_kernel[grid](
        x2, y2, packed, s, ss, so, z, zs, zo,
        m, n, k * bits // 32, k // 16, ng, ng // mblk, k // bk, x2.stride(0), y2.stride(0),
        BITS=bits, G=group, QMETA=qmeta, MBLK=mblk, BM=bm, BN=bn, BK=bk, GROUP_M=8,
        num_warps=8 if bm == 128 else 4, num_stages=3,
    )


def _launch_dequant(out: torch.Tensor, bits, group, n, k, w1) -> None:
    packed, (s, ss, so), (z, zs, zo), qmeta = w1
    ng = k // group
    mblk = _meta_block(ng) if qmeta else 1
    bn, bk = 32, _pick_bk(k, group, 256)
    _dequant_kernel[(triton.cdiv(n, bn), k // bk)](
        out, packed, s, ss, so, z, zs, zo, n, k, k * bits // 32, k // 16, ng, ng // mblk,
        BITS=bits, G=group, QMETA=qmeta, MBLK=mblk, BN=bn, BK=bk, num_warps=4,
    )


def _weight(packed, scale, zero, bits, group_size, n, k):
    """(packed, scale args, zero args, QMETA): QMETA 0 for float16 metadata, else the code bits (8 or 4)."""
    ng = k // group_size
    qmeta = scale.bits if isinstance(scale, QuantizedMeta) else 0
    if qmeta == 4 and not (isinstance(zero, QuantizedMeta) and zero.bits == 4 and scale.shift == 0 and zero.shift == 4
                           and zero.q.data_ptr() == scale.q.data_ptr()):
        raise MoeOffloadError("4-bit scale and zero codes must share one byte per group (scale low nibble, zero high)")
    if isinstance(zero, QuantizedMeta) and qmeta != zero.bits:
        raise MoeOffloadError(f"scale and zero codes must have the same bits, got {qmeta} and {zero.bits}")
    return packed, _meta_args(scale, "scale", n, ng, qmeta), _meta_args(zero, "zero", n, ng, qmeta), qmeta


def quant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: Meta,
    zero: Meta,
    bits: int,
    group_size: int,
    n: int,
    k: int,
    out: Optional[torch.Tensor] = None,
    int8_activations: bool = False,
) -> torch.Tensor:
    """y = x @ dequantize(W).T -> [..., n] in x's dtype (bfloat16 or float16), fp32 accumulation.

    ``packed``: int32 [n, k*bits//32] (:mod:`moe_offload.quant.pack`); ``scale``/``zero``: float16
    [n, k//group_size], or :class:`~moe_offload.quant.hqq.QuantizedMeta` (uint8 + step/offset).
    Reference: ``F.linear(x, moe_offload.quant.hqq.dequantize(qt, x.dtype))``.
    M (rows of x) <= GEMV_MAX_M[bits]: GEMV; below DEQUANT_MIN_M[bits]: fused tiled GEMM; else
    dequantize to scratch + cuBLAS (that path allocates the [n, k] scratch).
    ``int8_activations``: the GEMV rounds x to int8 per block of 32 first (:mod:`.gemv_int8`; faster,
    approximate); the other paths are unchanged.
    """
    _check_weight(x, packed, bits, group_size, n, k)
    w = _weight(packed, scale, zero, bits, group_size, n, k)
    x2 = _rows(x, k)
    m = x2.shape[0]
    out, y2 = _out(x, n, m, out)
    if m == 0:
        return out
    if m <= GEMV_MAX_M[bits] and _gemv_ok(bits, group_size):
        _gemv(x2, y2, bits, group_size, n, k, w, int8=int8_activations)
    elif m < DEQUANT_MIN_M[bits]:
        _launch_gemm(x2, y2, bits, group_size, n, k, w)
    else:
        wd = torch.empty((n, k), device=x.device, dtype=x.dtype)
        _launch_dequant(wd, bits, group_size, n, k, w)
        torch.matmul(x2, wd.t(), out=y2)
    return out


def dequantize_cuda(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dequantize(qt, dtype) on the GPU in one pass (bfloat16/float16/float32). Reference: hqq.dequantize."""
    n, k = qt.shape
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise MoeOffloadError(f"dequantize_cuda writes bfloat16, float16 or float32, got {dtype}")
    probe = torch.empty((0, k), device=qt.device, dtype=torch.bfloat16)
    _check_weight(probe, qt.qweight, qt.spec.bits, qt.spec.group_size, n, k)
    if out is None:
        out = torch.empty((n, k), device=qt.device, dtype=dtype)
    elif tuple(out.shape) != (n, k) or out.dtype != dtype or not out.is_contiguous():
        raise MoeOffloadError(f"out must be a contiguous {dtype} tensor [{n}, {k}]")
    _launch_dequant(out, qt.spec.bits, qt.spec.group_size, n, k, _weight(qt.qweight, qt.scale, qt.zero, qt.spec.bits, qt.spec.group_size, n, k))
    return out


def quant_linear(x: torch.Tensor, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None,
                 int8_activations: bool = False) -> torch.Tensor:
    """``QuantLinear``'s matmul hook: the fused kernel on CUDA, the reference elsewhere."""
    if not x.is_cuda:
        from ..quant.linear import reference_matmul

        return reference_matmul(x, qt, bias)
    n, k = qt.shape
    y = quant_matmul(x, qt.qweight, qt.scale, qt.zero, qt.spec.bits, qt.spec.group_size, n, k,
                     int8_activations=int8_activations)
    return y if bias is None else y.add_(bias.to(y.dtype))


def gate_up_silu(x: torch.Tensor, gate: QuantizedTensor, up: QuantizedTensor, out: Optional[torch.Tensor] = None,
                 int8_activations: bool = False) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) -> [..., n]; one launch reading both matrices for decode-sized M.

    Reference: ``F.silu(F.linear(x, dequantize(gate))) * F.linear(x, dequantize(up))`` (the GEMV
    path keeps both products in fp32 until the final cast, so it is slightly more exact).
    """
    if gate.shape != up.shape or gate.spec != up.spec:
        raise MoeOffloadError(f"gate {gate.shape} {gate.spec} and up {up.shape} {up.spec} must match")
    n, k = gate.shape
    bits, group = gate.spec.bits, gate.spec.group_size
    x2 = _rows(x, k)
    m = x2.shape[0]
    if m > GEMV_MAX_M[bits] or not _gemv_ok(bits, group):
        a = quant_matmul(x, gate.qweight, gate.scale, gate.zero, bits, group, n, k)
        b = quant_matmul(x, up.qweight, up.scale, up.zero, bits, group, n, k)
        return torch.mul(F.silu(a), b, out=out) if out is not None else F.silu(a).mul_(b)
    _check_weight(x, gate.qweight, bits, group, n, k)
    _check_weight(x, up.qweight, bits, group, n, k)
    out, y2 = _out(x, n, m, out)
    if m:
        _gemv(x2, y2, bits, group, n, k, _weight(gate.qweight, gate.scale, gate.zero, bits, group, n, k),
              _weight(up.qweight, up.scale, up.zero, bits, group, n, k), int8=int8_activations)
    return out


def expert_forward(
    x: torch.Tensor,
    gate: QuantizedTensor,
    up: QuantizedTensor,
    down: QuantizedTensor,
    out: Optional[torch.Tensor] = None,
    hidden: Optional[torch.Tensor] = None,
    int8_activations: bool = False,
) -> torch.Tensor:
    """A Mixtral expert, (silu(x @ w1.T) * (x @ w3.T)) @ w2.T: two launches at decode batch sizes.

    ``hidden`` ([..., intermediate] in x's dtype) and ``out`` make it allocation-free for graph capture.
    """
    h = gate_up_silu(x, gate, up, out=hidden, int8_activations=int8_activations)
    n, k = down.shape
    return quant_matmul(h, down.qweight, down.scale, down.zero, down.spec.bits, down.spec.group_size, n, k, out=out,
                        int8_activations=int8_activations)


def grouped_expert_forward(
    x: torch.Tensor,
    ids: torch.Tensor,
    gate: QuantizedTensor,
    up: QuantizedTensor,
    down: QuantizedTensor,
    expert_stride: int,
    out: Optional[torch.Tensor] = None,
    hidden: Optional[torch.Tensor] = None,
    int8_activations: bool = False,
) -> torch.Tensor:
    """Several experts of one stack on one token: x [1, D], ids [K] -> [K, D], row k = expert ids[k](x).

    ``gate``/``up``/``down`` are expert 0's tensors (views into a [E, B] byte buffer: a layer's resident
    experts, or the offload cache's slots); expert j's lie ``j * expert_stride`` bytes further. Two launches
    for all K experts, the choice read from ``ids`` on the device: no host sync, capturable in a CUDA graph.
    Row k equals ``expert_forward(x, gate_j, up_j, down_j)`` for j = ids[k], bit for bit (the same kernel
    configuration runs per row). Reference: that function, i.e. dequantize-then-matmul per expert.
    """
    n_i, d = gate.shape
    if down.shape != (d, n_i) or up.shape != gate.shape or gate.spec != up.spec:
        raise MoeOffloadError(f"gate {gate.shape}, up {up.shape} and down {down.shape} do not form an expert")
    if expert_stride <= 0 or expert_stride % 64:
        raise MoeOffloadError(f"expert_stride={expert_stride} must be a positive multiple of 64 bytes")
    for qt in (gate, down):
        if not _gemv_ok(qt.spec.bits, qt.spec.group_size):
            raise MoeOffloadError(f"grouped experts need GEMV-capable weights, got {qt.spec}")
    x2 = _rows(x, d)
    if x2.shape[0] != 1:
        raise MoeOffloadError(f"grouped experts take one token, got {x2.shape[0]}")
    if ids.dim() != 1 or ids.device != x.device or ids.dtype not in (torch.int32, torch.int64) or not ids.is_contiguous():
        raise MoeOffloadError(f"ids must be a contiguous 1-D int32/int64 tensor on {x.device}")
    m = ids.numel()
    if hidden is None:
        hidden = torch.empty((m, n_i), device=x.device, dtype=x.dtype)
    for qt, inputs in ((gate, x2), (up, x2), (down, hidden)):
        _check_weight(inputs, qt.qweight, qt.spec.bits, qt.spec.group_size, *qt.shape)
    if out is None:
        out = torch.empty((m, d), device=x.device, dtype=x.dtype)
    if tuple(hidden.shape) != (m, n_i) or tuple(out.shape) != (m, d) or hidden.dtype != x.dtype or out.dtype != x.dtype:
        raise MoeOffloadError(f"hidden/out must be {x.dtype} [{m}, {n_i}] / [{m}, {d}]")
    if m == 0:
        return out
    bits, group = gate.spec.bits, gate.spec.group_size
    _gemv(x2, hidden, bits, group, n_i, d, _weight(gate.qweight, gate.scale, gate.zero, bits, group, n_i, d),
          _weight(up.qweight, up.scale, up.zero, bits, group, n_i, d), grouped=(ids, expert_stride), int8=int8_activations)
    bits, group = down.spec.bits, down.spec.group_size
    _gemv(hidden, out, bits, group, d, n_i, _weight(down.qweight, down.scale, down.zero, bits, group, d, n_i),
          grouped=(ids, expert_stride), int8=int8_activations)
    return out
