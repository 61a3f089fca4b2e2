"""Prefill experts without a dequantized weight in memory: one launch per projection for any number of experts.

A prefill's (token, rank) pairs are sorted by expert and cut into *blocks*: at most BM consecutive pairs of one
expert. A program multiplies one block's token rows by one BN-wide tile of its expert's HQQ weight, dequantizing the
tile in registers with the reference's rounding (``quant_kernels._gemm_kernel``'s arithmetic) and feeding ``tl.dot``
(tensor cores, float32 accumulation). The gated launch computes gate and up tiles side by side and writes
silu(gate) * up; the down launch writes each pair's output row where the caller wants it.

Why: the dequantize-then-cuBLAS path costs, per expert, three dequantize launches writing 3 x 117 MiB (Mixtral), three
GEMMs and ~10 eager launches of host time (~0.4 ms), so a 512-token prefill was host-bound (BENCHMARKS.md, session
12). Here a whole layer is two launches, or two per expert where experts arrive one by one (offloading).

Arithmetic: an output row depends only on its own token row and expert (no split-K, one configuration per weight
shape), so computing an expert alone or beside others, resident or from an offload slot, gives the same bits.
Reference: :func:`moe_gemm_reference` (dequantize, then matmul in float32, expert by expert).
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..errors import MoeOffloadError
from ..quant.hqq import QuantizedTensor, dequantize
from .quant_kernels import _check_weight, _load_codes, _load_meta, _meta_block, _weight


@triton.jit
def _dequant_tile(w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr, rows, c, KW, K16, NG, NB, dtype,
                  BITS: tl.constexpr, G: tl.constexpr, QMETA: tl.constexpr, MBLK: tl.constexpr, BK: tl.constexpr):
    """Chunk c of the given weight rows, dequantized to ``dtype`` -> [BN, BK] (the reference's rounding)."""
    NGC: tl.constexpr = BK // G
    BN: tl.constexpr = rows.shape[0]
    q = tl.reshape(_load_codes(w_ptr, rows, c, KW, K16, BITS, BK), (BN, NGC, G))
    g = c * NGC + tl.arange(0, NGC)
    s = _load_meta(s_ptr, ss_ptr, so_ptr, rows, g, NG, NB, QMETA, MBLK, False)
    z = _load_meta(z_ptr, zs_ptr, zo_ptr, rows, g, NG, NB, QMETA, MBLK, True)
    return tl.reshape((q - z[:, :, None]) * s[:, :, None], (BN, BK)).to(dtype)


@triton.jit
def _shift(w, s, ss, so, z, zs, zo, e, ES_W, ES_M, ES_H):
    """A stack's expert e: its tensors lie e strides after expert 0's (int32 words, metadata elements, float16 steps)."""
    return w + e * ES_W, s + e * ES_M, ss + e * ES_H, so + e * ES_H, z + e * ES_M, zs + e * ES_H, zo + e * ES_H


@triton.jit
def _moe_gemm_kernel(
    x_ptr, src_ptr, y_ptr, dst_ptr, blocks_ptr,
    w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr,
    w2_ptr, s2_ptr, ss2_ptr, so2_ptr, z2_ptr, zs2_ptr, zo2_ptr,
    M, N, KW, K16, NG, NB, n_chunks, stride_xm, stride_ym, ES_W, ES_M, ES_H,
    BITS: tl.constexpr, G: tl.constexpr, QMETA: tl.constexpr, MBLK: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GATED: tl.constexpr, TABLE: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
):
    """Rows [start, start + count) of the pair list, all of expert e, times one BN tile of that expert's weight.

    TABLE: block b is (e, start, count) at blocks_ptr + 3b (e: index in the stack whose expert 0 the weight pointers
    are; its tensors lie e strides further); else block b is rows [b BM, min((b+1) BM, M)) of expert 0.
    GATHER: pair row r reads x row src[r] (else row r); SCATTER: it writes y row dst[r] (else row r).
    """
    pid_n = tl.program_id(0)  # fastest: programs running together share the block's x rows in L2
    blk = tl.program_id(1)
    if TABLE:
        e = tl.load(blocks_ptr + 3 * blk).to(tl.int64)
        start = tl.load(blocks_ptr + 3 * blk + 1)
        count = tl.load(blocks_ptr + 3 * blk + 2)
    else:
        e = 0
        start = blk * BM
        count = tl.minimum(M - start, BM)
    if count > 0:
        r = tl.arange(0, BM)
        pair = start + tl.minimum(r, count - 1)  # rows past the block repeat its last: loads stay in bounds
        src = tl.load(src_ptr + pair).to(tl.int64) if GATHER else pair.to(tl.int64)
        w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr = _shift(
            w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr, e, ES_W, ES_M, ES_H)
        if GATED:
            w2_ptr, s2_ptr, ss2_ptr, so2_ptr, z2_ptr, zs2_ptr, zo2_ptr = _shift(
                w2_ptr, s2_ptr, ss2_ptr, so2_ptr, z2_ptr, zs2_ptr, zo2_ptr, e, ES_W, ES_M, ES_H)
        rows = tl.minimum(pid_n * BN + tl.arange(0, BN), N - 1)
        acc = tl.zeros((BM, BN), tl.float32)
        acc2 = tl.zeros((BM, BN), tl.float32)
        for c in range(n_chunks):
            x = tl.load(x_ptr + src[:, None] * stride_xm + c * BK + tl.arange(0, BK)[None, :])
            w = _dequant_tile(w_ptr, s_ptr, ss_ptr, so_ptr, z_ptr, zs_ptr, zo_ptr, rows, c, KW, K16, NG, NB,
                              x.dtype, BITS, G, QMETA, MBLK, BK)
            acc = tl.dot(x, tl.trans(w), acc)
            if GATED:
                w2 = _dequant_tile(w2_ptr, s2_ptr, ss2_ptr, so2_ptr, z2_ptr, zs2_ptr, zo2_ptr, rows, c, KW, K16, NG,
                                   NB, x.dtype, BITS, G, QMETA, MBLK, BK)
                acc2 = tl.dot(x, tl.trans(w2), acc2)
        if GATED:
            acc = acc / (1.0 + tl.exp(-acc)) * acc2  # silu(gate) * up in float32, rounded once
        dst = tl.load(dst_ptr + pair).to(tl.int64) if SCATTER else pair.to(tl.int64)
        offs_n = pid_n * BN + tl.arange(0, BN)
        mask = (r[:, None] < count) & (offs_n[None, :] < N)
        tl.store(y_ptr + dst[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# Pairs per block: shared by both launches of a layer (they read one block table).
BLOCK_PAIRS = 64
# MOE_OFFLOAD_PREFILL_KERNELS=0: prefill experts the older way (dequantize to scratch, then cuBLAS, expert by expert;
# benchmarks' A/B). Read once: a process computes every prefill one way.
ENABLED = os.environ.get("MOE_OFFLOAD_PREFILL_KERNELS", "1") != "0"


class MoeGemmConfig(NamedTuple):
    bn: int
    bk: int
    warps: int
    stages: int


# (bits, group, n, k, gated) -> config; benchmarks/moe_gemm.py fills it to try others. One configuration per weight
# shape, never per M: an expert's rows must not change with how many tokens it got or who shared its launch.
MOE_GEMM_OVERRIDES: dict[tuple, MoeGemmConfig] = {}


def moe_gemm_config(bits: int, group: int, n: int, k: int, gated: bool) -> MoeGemmConfig:
    override = MOE_GEMM_OVERRIDES.get((bits, group, n, k, gated))
    if override is not None:
        return override
    # The fastest of benchmarks/moe_gemm.py --sweep on an H100 (Mixtral 4/2, 512 tokens; session 12).
    return MoeGemmConfig(bn=64, bk=max(128, group), warps=4, stages=3) if gated else \
        MoeGemmConfig(bn=128, bk=max(64, group), warps=4, stages=3)


def fits(qt: QuantizedTensor) -> bool:
    """Whether the prefill kernels take this weight (any bit width the GEMM takes, K a whole number of tiles)."""
    bits, group = qt.spec.bits, qt.spec.group_size
    n, k = qt.shape
    tiles = (moe_gemm_config(bits, group, n, k, gated).bk for gated in (False, True))
    return bits in (2, 3, 4, 8) and k % 32 == 0 and all(k % bk == 0 and bk % group == 0 for bk in tiles)


def _launch(x2, y2, w1, w2, bits, group, n, k, m, blocks, src, dst, stack_stride) -> None:
    cfg = moe_gemm_config(bits, group, n, k, w2 is not None)
    ng = k // group
    qmeta = w1[3]
    mblk = _meta_block(ng) if qmeta else 1
    if k % cfg.bk:
        raise MoeOffloadError(f"K={k} must be a multiple of the prefill tile ({cfg.bk})")
    if blocks is None:
        nblocks = triton.cdiv(m, BLOCK_PAIRS)
        es = (0, 0, 0)
    else:
        nblocks = blocks.shape[0]
        meta_item = w1[1][0].element_size()
        es = (stack_stride // 4, stack_stride // meta_item, stack_stride // 2)
    if nblocks == 0:
        return
    packed, (s, ss, so), (z, zs, zo), _ = w1
    packed2, (s2, ss2, so2), (z2, zs2, zo2), _ = w2 if w2 is not None else w1
    dummy = x2
    _moe_gemm_kernel[(triton.cdiv(n, cfg.bn), nblocks)](
        x2, src if src is not None else dummy, y2, dst if dst is not None else dummy,
        blocks if blocks is not None else dummy,
        packed, s, ss, so, z, zs, zo, packed2, s2, ss2, so2, z2, zs2, zo2,
        m, n, k * bits // 32, k // 16, ng, ng // mblk, k // cfg.bk, x2.stride(0), y2.stride(0), *es,
        BITS=bits, G=group, QMETA=qmeta, MBLK=mblk, BM=BLOCK_PAIRS, BN=cfg.bn, BK=cfg.bk,
        GATED=w2 is not None, TABLE=blocks is not None, GATHER=src is not None, SCATTER=dst is not None,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )


def _checked(qt: QuantizedTensor, x: torch.Tensor):
    n, k = qt.shape
    _check_weight(x, qt.qweight, qt.spec.bits, qt.spec.group_size, n, k)
    return _weight(qt.qweight, qt.scale, qt.zero, qt.spec.bits, qt.spec.group_size, n, k)


def expert_rows(x: torch.Tensor, gate: QuantizedTensor, up: QuantizedTensor, down: QuantizedTensor,
                out: Optional[torch.Tensor] = None, *, blocks: Optional[torch.Tensor] = None,
                src: Optional[torch.Tensor] = None, dst: Optional[torch.Tensor] = None, pairs: Optional[int] = None,
                stack_stride: int = 0) -> torch.Tensor:
    """SwiGLU experts over rows of x: down(silu(gate(x_r)) * up(x_r)) for every pair row r, two launches.

    Without ``blocks``: every row of x through this one expert -> [M, D] (``out``: where to write it).
    With ``blocks`` (int32 [nb, 3] on the device: stack index, first pair, pairs; empty blocks allowed): ``pairs``
    rows, pair r reading x row ``src[r]`` and writing ``out`` row ``dst[r]`` (int64, device); the weights given are
    the stack's expert 0 and expert j's lie ``j * stack_stride`` bytes further (a layer's resident stack).
    Reference: :func:`moe_gemm_reference`.
    """
    d = x.shape[-1]
    n_i = gate.shape[0]
    if gate.shape != up.shape or gate.spec != up.spec or down.shape != (d, n_i) or gate.shape[1] != d:
        raise MoeOffloadError(f"gate {gate.shape}, up {up.shape} and down {down.shape} do not form an expert of width {d}")
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if blocks is not None and pairs is None:
        raise MoeOffloadError("a block table needs pairs= (the number of rows it covers)")
    m = x2.shape[0] if blocks is None else int(pairs)
    wg, wu = _checked(gate, x2), _checked(up, x2)
    hidden = torch.empty((m, n_i), device=x.device, dtype=x.dtype)
    wd = _checked(down, hidden)
    if out is None:
        out = torch.empty((m, d), device=x.device, dtype=x.dtype)
    if out.dtype != x.dtype or out.shape[-1] != d or not out.is_contiguous():
        raise MoeOffloadError(f"out must be a contiguous {x.dtype} tensor [.., {d}]")
    if blocks is not None:
        if stack_stride <= 0 or stack_stride % 64:
            raise MoeOffloadError(f"stack_stride={stack_stride} must be a positive multiple of 64 bytes")
        if blocks.dtype != torch.int32 or blocks.dim() != 2 or blocks.shape[1] != 3 or not blocks.is_contiguous():
            raise MoeOffloadError("blocks must be a contiguous int32 [nb, 3] tensor (stack index, first pair, pairs)")
    bits, group = gate.spec.bits, gate.spec.group_size
    # gate+up: pair r reads x row src[r]; hidden row r. down: hidden row r, out row dst[r].
    _launch(x2, hidden, wg, wu, bits, group, n_i, d, m, blocks, src, None, stack_stride)
    bits, group = down.spec.bits, down.spec.group_size
    _launch(hidden, out.view(-1, d), wd, None, bits, group, d, n_i, m, blocks, None, dst, stack_stride)
    return out


def moe_gemm_reference(x: torch.Tensor, gate: QuantizedTensor, up: QuantizedTensor,
                       down: QuantizedTensor) -> torch.Tensor:
    """What :func:`expert_rows` computes for one expert, in float32 from the dequantized weights -> x's dtype.
    The kernel rounds the weights to x's dtype as the reference path does; here they are rounded the same way."""
    xf = x.float()
    wg, wu, wd = (dequantize(qt, x.dtype).float() for qt in (gate, up, down))
    h = (F.silu(xf @ wg.t()) * (xf @ wu.t())).to(x.dtype).float()
    return (h @ wd.t()).to(x.dtype)


def route_blocks(indices: torch.Tensor, num_experts: int, bm: int = BLOCK_PAIRS) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's routing on the device -> (order int64 [P], blocks int32 [nb, 3]), no host sync.

    ``order``: the pair positions t * K + k sorted by expert (stable: by token within an expert); ``blocks``: at most
    ``bm`` consecutive sorted pairs of one expert each, (expert, first sorted pair, pairs), padded with empty blocks to
    the bound P // bm + E so that the shape never depends on the routing."""
    flat = indices.reshape(-1)
    p = flat.numel()
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    nblk = (counts + bm - 1) // bm
    ends = torch.cumsum(nblk, 0)
    b = torch.arange(p // bm + num_experts, device=flat.device)
    e = torch.searchsorted(ends, b, right=True).clamp_(max=num_experts - 1)
    j = b - (ends - nblk)[e]
    first = (torch.cumsum(counts, 0) - counts)[e] + j * bm
    count = (counts[e] - j * bm).clamp_(0, bm)
    return order, torch.stack([e, first, count], 1).to(torch.int32).contiguous()
