"""The prefill experts kernels (kernels/moe_gemm.py) on Mixtral's shapes against dequantize-then-cuBLAS.

Usage (GPU machine): python3 benchmarks/moe_gemm.py [--preset 4/2] [--tokens 512] [--sweep] [--json FILE]
Times one expert at tokens * K / E rows (gate+up+SiLU, then down) both ways, and a whole layer of E experts:
the stack's two launches against the old path expert by expert. ``--sweep`` tries tile configurations for each
projection and prints the fastest (to put into moe_gemm_config).
"""

import argparse
import itertools
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from moe_offload.kernels import moe_gemm, quant_kernels
from moe_offload.quant.presets import PRESETS

import sys, os  # noqa: E401
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "kernels"))
from kernel_helpers import expert_stack  # noqa: E402


def old_expert(x, g, u, d):
    n, k = g.shape
    a = quant_kernels.quant_matmul(x, g.qweight, g.scale, g.zero, g.spec.bits, g.spec.group_size, n, k)
    b = quant_kernels.quant_matmul(x, u.qweight, u.scale, u.zero, u.spec.bits, u.spec.group_size, n, k)
    h = F.silu(a).mul_(b)
    n, k = d.shape
    return quant_kernels.quant_matmul(h, d.qweight, d.scale, d.zero, d.spec.bits, d.spec.group_size, n, k)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="4/2")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    spec = PRESETS[args.preset].experts
    E, K, D, I = 8, 2, 4096, 14336
    buf, stride, experts = expert_stack(spec, E, D, I, "cuda")
    m = args.tokens * K // E
    x = torch.randn(m, D, device="cuda", dtype=torch.bfloat16)
    g, u, d = experts[0]
    res = {"preset": args.preset, "tokens": args.tokens, "rows_per_expert": m}
    res["old_expert_us"] = do_bench(lambda: old_expert(x, g, u, d)) * 1e3
    res["new_expert_us"] = do_bench(lambda: moe_gemm.expert_rows(x, g, u, d)) * 1e3
    err = (moe_gemm.expert_rows(x, g, u, d).float() - old_expert(x, g, u, d).float()).abs().max().item()
    res["max_abs_diff_vs_old"] = err
    gen = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(args.tokens)]).cuda()
    xt = torch.randn(args.tokens, D, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(args.tokens * K, D, device="cuda", dtype=torch.bfloat16)

    def layer_new():
        order, blocks = moe_gemm.route_blocks(indices, E)
        moe_gemm.expert_rows(xt, g, u, d, out=y, blocks=blocks, src=order // K, dst=order, pairs=args.tokens * K,
                             stack_stride=stride)

    flat = indices.reshape(-1)
    sel = [(flat == e).nonzero().reshape(-1) // K for e in range(E)]

    def layer_old():
        for e in range(E):
            old_expert(xt[sel[e]], *experts[e])

    res["old_layer_us"] = do_bench(layer_old) * 1e3
    res["new_layer_us"] = do_bench(layer_new) * 1e3
    print(json.dumps(res), flush=True)
    if args.sweep:  # gate+up first (down at its default), then down with the best gate+up; then the block size
        best = {}
        for gated, (n, k) in ((True, (I, D)), (False, (D, I))):
            # Session 12 also tried the transposed product (weight tile as the first operand): never faster.
            for bm, bn, bk, warps, stages in itertools.product((64, 128), (64, 128), (64, 128), (4, 8), (3,)):
                if (gated and bn == 128 and bk == 128) or (bm == 128 and warps == 4):
                    continue
                moe_gemm.BLOCK_PAIRS = bm
                cfg = moe_gemm.MoeGemmConfig(bn, bk, warps, stages)
                moe_gemm.MOE_GEMM_OVERRIDES[(spec.bits, spec.group_size, n, k, gated)] = cfg
                try:
                    t = do_bench(layer_new) * 1e3
                except Exception as e:  # noqa: BLE001 (out of shared memory and the like)
                    print(f"gated={gated} bm={bm} {cfg}: {type(e).__name__}", flush=True)
                    continue
                print(f"gated={gated} bm={bm} {cfg}: layer {t:.0f} us", flush=True)
                if t < best.get(gated, (1e9,))[0]:
                    best[gated] = (t, bm, *cfg)
            moe_gemm.BLOCK_PAIRS = best[gated][1]
            moe_gemm.MOE_GEMM_OVERRIDES[(spec.bits, spec.group_size, n, k, gated)] = moe_gemm.MoeGemmConfig(
                *best[gated][2:])
        res["best"] = {str(k): v for k, v in best.items()}
        print(json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
