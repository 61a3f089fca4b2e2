"""Compile the int8 GEMV for sm_90 without a GPU and count the instructions of its main loop (a script).

    PYTHONPATH=. python benchmarks/probe/sass.py BITS GROUP QMETA N K GATED BN BU WARPS [--prefetch] [--exact] [--dump DIR]

Triton ships ptxas and nvdisasm, so this runs on the CPU-only machine. It is how session 9 found the int8 GEMV's
shared-memory shuffles, per-chunk block reductions and scalar loads (BENCHMARKS.md): look for BAR.SYNC, STS/LDS
and SHFL in the loop, and at the instructions per packed word.
"""

from __future__ import annotations

import argparse
import collections
import os
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moe_offload.kernels import gemv_int8 as I8
from moe_offload.kernels.quant_kernels import _meta_block

SIZES = ("M", "N", "KU", "KB", "KW", "NG", "NB", "ES_W", "ES_M", "ES_H")
ALIGNED = ("N", "KU", "KB", "KW", "NG", "stride_qm", "stride_wm")  # as the JIT specializes them for Mixtral


def compile_gemv(bits, group, qmeta, n, k, gated, bn, bu, warps, prefetch=False, exact=False):
    fn = I8._gemv_int8_kernel
    names = fn.arg_names
    meta_t = "*u8" if qmeta else "*fp16"
    ptrs = {"xq_ptr": "*fp32" if exact else "*i32", "xw_ptr": "*fp32", "y_ptr": "*bf16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
            "ids_ptr": "*i32", "w_ptr": "*i32", "w2_ptr": "*i32", "s_ptr": meta_t, "z_ptr": meta_t,
            "s2_ptr": meta_t, "z2_ptr": meta_t}
    sig = {a: ptrs.get(a, "*fp16") if a.endswith("_ptr") else
           "i32" if a in SIZES or a.startswith("stride") else "constexpr" for a in names}
    u = I8.unit(bits)
    ng = k // group
    mblk = _meta_block(ng) if qmeta else 1
    consts = dict(BITS=bits, G=group, QMETA=qmeta, MBLK=mblk, BN=bn, BU=bu, SPLIT=1, GATED=gated, GROUPED=False,
                  CHUNKS=k // u // bu, META_CHUNK=qmeta and (group * mblk) % (bu * u) == 0, PREFETCH=prefetch,
                  VEC=I8._per_thread(bu, warps), VEC_HI=I8._per_thread(bu // 2, warps), EXACT=exact, ASM=True)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if sig[a].startswith("*") or a in ALIGNED}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(c),): v for c, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})


def loop_ops(sass: str) -> tuple[int, collections.Counter]:
    """Length and opcode counts of the longest backward-branching block (the chunk loop)."""
    lines = sass.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"^\w+:$", line)}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA (\w+);", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > len(best):
            best = lines[labels[m.group(1)] + 1: i + 1]
    ops = collections.Counter(m.group(1) for b in best
                              if (m := re.match(r"^\S+\t(?:@!?U?P\w+ )?([A-Z][A-Z0-9_.]*)", b)))
    return len(best), ops


def main():
    ap = argparse.ArgumentParser()
    for name in ("bits", "group", "qmeta", "n", "k", "gated", "bn", "bu", "warps"):
        ap.add_argument(name, type=int)
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument("--exact", action="store_true", help="the exact path (float32 x planes)")
    ap.add_argument("--dump", help="write the SASS, PTX and TTGIR there")
    a = ap.parse_args()
    c = compile_gemv(a.bits, a.group, bool(a.qmeta), a.n, a.k, bool(a.gated), a.bn, a.bu, a.warps, a.prefetch, a.exact)
    n, ops = loop_ops(c.asm["sass"])
    words = a.bn * max(1, a.bu // (32 * a.warps)) * (2 if a.gated else 1)  # per thread per chunk
    print(f"loop: {n} instructions for {words} (row, word) pairs per thread: {n / words:.1f} a word")
    print(", ".join(f"{op} {k}" for op, k in ops.most_common()))
    if a.dump:
        os.makedirs(a.dump, exist_ok=True)
        for kind in ("sass", "ptx", "ttgir"):
            with open(os.path.join(a.dump, f"gemv_int8.{kind}"), "w") as f:
                f.write(c.asm[kind])


if __name__ == "__main__":
    main()
