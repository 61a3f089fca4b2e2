"""Batch-1 GEMV with int8 activations against the exact GEMV, on one CUDA GPU (a script, not the package).

    PYTHONPATH=. python benchmarks/gemv_int8.py [--sweep [--wide]] [--baseline] [--jobs 12] [--json out.json]

Same method as benchmarks/kernels.py: CUDA-graph replays rotating over >= 16 experts and >= 4x the L2, packed
bytes (codes + scale/zero) per second against a device-to-device copy measured in the same run. The int8
times include the small kernel that rounds each product's input to int8 (one per launch).
--sweep tries int8 block configs per matrix first and keeps the fastest.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import multiprocessing as mp
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from kernels import FFN, HIDDEN, d2d_bandwidth, expert_pool, graph_time, rand_qt, sets_needed  # noqa: E402

from moe_offload.kernels import gemv_int8 as I8  # noqa: E402
from moe_offload.kernels import quant_kernels as Q  # noqa: E402
from moe_offload.quant.hqq import dequantize  # noqa: E402

FORMATS = [(2, 16, True), (2, 32, False), (3, 64, False), (4, 64, False)]  # (bits, group, quant_meta)
ATTENTION = [(6144, HIDDEN), (HIDDEN, HIDDEN)]  # stacked q/k/v, o (4-bit g64)


def variants(wide: bool = False) -> list[tuple]:
    """Block configs to try. The narrow set spreads a tile's rows over threads; the wide set (--wide) spans the
    units with every thread of the program, so each thread holds all its rows and reads each x8 word once for
    them all (fewer L1 requests per packed word)."""
    if wide:
        return wide_variants()
    out = []
    for bits, group, _ in FORMATS:
        for prefetch in (False, True):
            for bn in (2, 4, 8):
                for bu in (32, 64):
                    for warps in (2, 4):
                        out.append((bits, group, FFN, HIDDEN, True, I8.Int8Config(bn, bu, warps, 1, prefetch)))
            for bn in (2, 4):
                for warps in (4, 8):
                    for split in (1, 2, 4):
                        out.append((bits, group, HIDDEN, FFN, False, I8.Int8Config(bn, 64, warps, split, prefetch)))
    return out


def exact_variants() -> list[tuple]:
    """The planes kernel with exact activations (key suffix "exact"), wide tiles only."""
    return wide_variants(exact=True)


def wide_variants(exact: bool = False) -> list[tuple]:
    """Wide tiles (4 words a thread); int8 also tries 8 rows, 64 and 512 units and split-K, and its shipped config."""
    tiles = ((128, 1), (256, 1), (128, 2), (256, 2)) if exact else ((64, 1), (128, 1), (256, 1), (128, 2), (256, 2),
                                                                     (512, 4))
    suffix = ("exact",) if exact else ()
    out = []
    for bits, group, _ in FORMATS:
        for n, k, gated in ((FFN, HIDDEN, True), (HIDDEN, FFN, False)):
            ku = k // I8.unit(bits)
            for prefetch in (False, True):
                for bn in (2, 4) if exact else (2, 4, 8):
                    for bu, warps in tiles:
                        for split in (1, 2) if not (gated or exact) and bn > 2 else (1,):  # split-K: more warps in flight
                            if ku % (bu * split) == 0:
                                out.append((bits, group, n, k, gated, I8.Int8Config(bn, bu, warps, split, prefetch))
                                           + suffix)
            if not exact:
                out.append((bits, group, n, k, gated, I8.config(bits, group, n, k, gated)))  # the shipped one
    return list(dict.fromkeys(out))


def _call(x, y, bits, group, n, k, qt, qt2=None, int8=True, planes=False):
    w1 = Q._weight(qt.qweight, qt.scale, qt.zero, bits, group, n, k)
    w2 = None if qt2 is None else Q._weight(qt2.qweight, qt2.scale, qt2.zero, bits, group, n, k)
    if int8 or planes:
        return lambda: I8.launch(x, y, bits, group, n, k, w1, w2, exact=planes)
    return lambda: Q._launch_gemv(x, y, bits, group, n, k, w1, w2)


def _compile_one(v: tuple) -> str:
    bits, group, n, k, gated, cfg = v[:6]
    exact = v[6:] == ("exact",)
    try:
        I8.OVERRIDES[(bits, group, n, k, gated) + v[6:]] = cfg
        qt = rand_qt(n, k, bits, group, group == 16)
        x = torch.randn(1, k, device="cuda").bfloat16()
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        _call(x, y, bits, group, n, k, qt, qt if gated else None, int8=not exact, planes=exact)()
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # noqa: BLE001 - reported
        return f"{type(e).__name__}: {e}"[:300]


def pool_of(n, k, bits, group, qmeta, l2, count=None):
    one = rand_qt(n, k, bits, group, qmeta)
    r = count or sets_needed(one.nbytes, l2)
    return [one] + [rand_qt(n, k, bits, group, qmeta, seed=i) for i in range(1, r)]


def rel_err(y, x, qt, qt2=None, int8=True):
    xf = I8.fake_quantize_reference(x) if int8 else x.float()
    ref = xf @ dequantize(qt).T
    exact = x.float() @ dequantize(qt).T
    if qt2 is not None:
        ref = F.silu(ref) * (xf @ dequantize(qt2).T)
        exact = F.silu(exact) * (x.float() @ dequantize(qt2).T)
    return ((y.float() - ref).norm() / ref.norm()).item(), ((y.float() - exact).norm() / exact.norm()).item()


def sweep(l2, d2d, jobs, results, wide=False, exact=False):
    vs = exact_variants() if exact else variants(wide)
    t = time.perf_counter()
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
        status = dict(zip(vs, ex.map(_compile_one, vs)))
    print(f"precompiled {len(vs)} variants in {time.perf_counter() - t:.0f} s", flush=True)
    rows, best, pools = [], {}, {}
    for v in vs:
        bits, group, n, k, gated, cfg = v[:6]
        ex = v[6:] == ("exact",)
        if status[v] != "ok":
            rows.append({"variant": list(map(str, v)), "error": status[v]})
            print("FAILED", v, status[v], flush=True)
            continue
        key = (bits, group, n, k)
        if key not in pools:
            pools.clear()
            pools[key] = pool_of(n, k, bits, group, group == 16, l2, count=None)
        qts = pools[key]
        okey = (bits, group, n, k, gated) + v[6:]
        I8.OVERRIDES[okey] = cfg
        x = torch.randn(1, k, device="cuda").bfloat16()
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        if gated:
            calls = [_call(x, y, bits, group, n, k, qts[i], qts[i + 1], int8=not ex, planes=ex)
                     for i in range(0, len(qts) - 1, 2)]
            nbytes = 2 * qts[0].nbytes
        else:
            calls = [_call(x, y, bits, group, n, k, qt, int8=not ex, planes=ex) for qt in qts]
            nbytes = qts[0].nbytes
        tt = graph_time(calls)
        calls[0]()
        err, _ = rel_err(y, x, qts[0], qts[1] if gated else None, int8=not ex)
        row = {"bits": bits, "group": group, "n": n, "k": k, "gated": gated, "exact": ex, "config": list(cfg),
               "us": tt * 1e6, "pct_d2d": 100 * nbytes / tt / d2d, "rel_err_vs_ref": err}
        rows.append(row)
        print(f"sweep {bits}b g{group} {n}x{k} gated={gated}{' exact' if ex else ''} {tuple(cfg)}: {tt * 1e6:6.1f} us "
              f"{row['pct_d2d']:5.1f}% err {err:.1e}", flush=True)
        if err < (1e-4 if ex else 1e-2) and (okey not in best or tt < best[okey][1]):
            best[okey] = (cfg, tt)
        del I8.OVERRIDES[okey]
    pools.clear()
    for bkey, (cfg, _) in best.items():
        I8.OVERRIDES[bkey] = cfg
    results["sweep"] = rows
    results["best_configs"] = [{"key": list(k), "config": list(c)} for k, (c, _) in best.items()]


def experts(l2, d2d):
    rows = []
    for bits, group, qmeta in FORMATS:
        pool, nbytes = expert_pool(bits, group, qmeta, l2)
        x = torch.randn(1, HIDDEN, device="cuda").bfloat16()
        h = torch.empty(1, FFN, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
        for mode in ("exact", "planes", "int8"):
            int8 = mode == "int8"
            Q.PLANES_EXACT.clear()
            if mode == "planes":
                Q.PLANES_EXACT.add((bits, group))
            calls = [lambda e=e: Q.expert_forward(x, *e, out=y, hidden=h, int8_activations=int8) for e in pool]
            t = graph_time(calls)
            Q.expert_forward(x, *pool[0], out=y, hidden=h, int8_activations=int8)
            Q.PLANES_EXACT.clear()
            g, u, d = (dequantize(q) for q in pool[0])
            exact = (F.silu(x.float() @ g.T) * (x.float() @ u.T)) @ d.T
            err = ((y.float() - exact).norm() / exact.norm()).item()
            row = {"kind": "expert", "mode": mode, "int8": int8, "bits": bits, "group": group, "quant_meta": qmeta, "us": t * 1e6,
                   "bytes": nbytes, "GBps": nbytes / t / 1e9, "pct_d2d": 100 * nbytes / t / d2d,
                   "rel_err_vs_exact_fp32": err}
            rows.append(row)
            print(f"expert {bits}b g{group}{' qm' if qmeta else ''} {mode:6s}: {t * 1e6:6.1f} us "
                  f"{row['GBps']:6.0f} GB/s {row['pct_d2d']:5.1f}% of D2D, rel err vs exact {err:.1e}", flush=True)
        del pool
    for k in (HIDDEN, FFN):  # the rounding kernel alone, included in every int8 time above
        x = torch.randn(1, k, device="cuda").bfloat16()
        bufs = [I8.quantize_activations(x, 2) for _ in range(16)]
        t = graph_time([lambda b=b: I8.quantize_activations(x, 2, b) for b in bufs])
        rows.append({"kind": "quantize", "k": k, "us": t * 1e6})
        print(f"quantize x[1, {k}] to int8 planes: {t * 1e6:5.2f} us", flush=True)
    for n, k in ATTENTION:
        qts = pool_of(n, k, 4, 64, False, l2)
        x = torch.randn(1, k, device="cuda").bfloat16()
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        for int8 in (False, True):
            t = graph_time([_call(x, y, 4, 64, n, k, q, int8=int8) for q in qts])
            rows.append({"kind": "attention", "int8": int8, "n": n, "k": k, "us": t * 1e6,
                         "pct_d2d": 100 * qts[0].nbytes / t / d2d})
            print(f"attention 4b g64 {n}x{k} {'int8 ' if int8 else 'exact'}: {t * 1e6:6.1f} us "
                  f"{rows[-1]['pct_d2d']:5.1f}%", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--wide", action="store_true", help="sweep the wide configs (rows in each thread)")
    ap.add_argument("--exact", action="store_true", help="sweep the exact planes kernel's configs instead")
    ap.add_argument("--baseline", action="store_true", help="time the whole experts with the shipped configs first")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--json", default="gemv_int8.json")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    d2d = d2d_bandwidth()
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": props.name,
               "torch": torch.__version__, "triton": __import__("triton").__version__, "d2d_GBps": d2d / 1e9}
    print(f"{props.name}: D2D {d2d / 1e9:.0f} GB/s", flush=True)
    if args.baseline:
        results["baseline_rows"] = experts(l2, d2d)
    if args.sweep:
        sweep(l2, d2d, args.jobs, results, args.wide, args.exact)
    results["rows"] = experts(l2, d2d)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
