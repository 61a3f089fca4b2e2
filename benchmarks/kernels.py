"""Benchmark the fused HQQ kernels on one CUDA GPU (a script; the package never imports it).

    PYTHONPATH=. python benchmarks/kernels.py [--sweep] [--jobs 8] [--json out.json]

Batch-1 times are CUDA-graph replays of calls that rotate over enough distinct weight sets (>= 16,
and >= 4x the L2 size in bytes) that every call reads its weights from device memory. Bandwidth
counts the packed bytes a call must read (codes + scale/zero) and is compared with a large
device-to-device copy measured in the same run (bytes read + bytes written over time).
--sweep first tries GEMV block configurations per shape and uses the fastest for the tables.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import math
import multiprocessing as mp
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from moe_offload.kernels import quant_kernels as Q
from moe_offload.quant.hqq import QuantizedMeta, QuantizedTensor, QuantSpec, meta_block
from moe_offload.quant.pack import pack

HIDDEN, FFN = 4096, 14336
SHAPES = [(FFN, HIDDEN), (HIDDEN, FFN), (HIDDEN, HIDDEN), (1024, HIDDEN)]
FORMATS = [(2, 32, False), (3, 64, False), (4, 64, False), (2, 16, True), (4, 128, False)]  # (bits, group, quant_meta)
SWEEP_FORMATS = FORMATS[:3]


def rand_qt(n: int, k: int, bits: int, group: int, quant_meta: bool = False, seed: int = 0) -> QuantizedTensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    ng = k // group
    codes = torch.randint(0, 2**bits, (n, k), device="cuda", generator=g)

    def meta(hi: float):
        if quant_meta:
            nb = ng // meta_block(ng)
            q = torch.randint(0, 256, (n, ng), device="cuda", generator=g, dtype=torch.uint8)
            return QuantizedMeta(q, torch.full((n, nb), hi / 255, device="cuda").half(), torch.zeros(n, nb, device="cuda").half())
        return (torch.rand(n, ng, device="cuda", generator=g) * hi).half()

    return QuantizedTensor(pack(codes, bits), meta(0.01), meta(2**bits - 1), (n, k), QuantSpec(bits, group, quant_meta))


def sets_needed(nbytes: int, l2: int) -> int:
    return max(16, math.ceil(4 * l2 / nbytes))


def graph_time(calls: list[Callable[[], None]], reps: int = 15) -> float:
    """Median seconds per call over CUDA-graph replays of all calls in sequence."""
    for f in calls:  # warm-up: compile, allocate split-K scratch
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times) / len(calls)


def event_time(f: Callable[[], None], reps: int = 10) -> float:
    f()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        f()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times)


def d2d_bandwidth() -> float:
    n = 2 << 30
    src = torch.randint(0, 255, (n,), device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    t = event_time(lambda: dst.copy_(src), reps=10)
    return 2 * n / t


def gemv_call(x, y, qt: QuantizedTensor, qt2: QuantizedTensor | None = None) -> Callable[[], None]:
    n, k = qt.shape
    b, g = qt.spec.bits, qt.spec.group_size
    w1 = Q._weight(qt.qweight, qt.scale, qt.zero, b, g, n, k)
    w2 = None if qt2 is None else Q._weight(qt2.qweight, qt2.scale, qt2.zero, b, g, n, k)
    return lambda: Q._launch_gemv(x, y, b, g, n, k, w1, w2)


# ------------------------------------------------------------------------------------------ sweep


def sweep_variants() -> list[tuple]:
    """(bits, group, n, k, gated, GemvConfig) to try."""
    out = []
    for bits, group, _ in SWEEP_FORMATS:
        unit = 16 if bits == 3 else 32 // bits

        def cfg(k, bn, words, warps, split, one_word=True, prefetch=False):
            return Q.GemvConfig(bn, Q._pick_bk(k, group, words * unit), warps, split, prefetch, None, one_word)

        # (BN, low-plane words per row per chunk, warps, one_word). 16-byte vectors (one_word False)
        # put min(32, words/4) lanes along K and one_word min(32, words), so rows per thread are
        # BN * lanes along K / (32 * warps).
        tiles = [(8, 128, 4, False), (4, 128, 4, False), (4, 64, 2, False), (8, 128, 8, False), (8, 64, 2, False),
                 (8, 32, 2, True), (4, 32, 2, True)]
        for bn, words, warps, ow in tiles:
            out.append((bits, group, FFN, HIDDEN, False, cfg(HIDDEN, bn, words, warps, 1, ow)))
        for bn, words, warps, ow in [t for t in tiles if t[2] <= 4][:6]:
            out.append((bits, group, FFN, HIDDEN, True, cfg(HIDDEN, bn, words, warps, 1, ow)))
        for bn, words, warps, ow, split in [(8, 128, 4, False, 1), (4, 128, 4, False, 1), (4, 64, 2, False, 1),
                                           (8, 128, 4, False, 2), (4, 32, 2, True, 1), (8, 32, 2, True, 1)]:
            out.append((bits, group, HIDDEN, FFN, False, cfg(FFN, bn, words, warps, split, ow)))
        for n in (HIDDEN, 1024):
            for bn, split in [(8, 1), (8, 2), (8, 4), (4, 1), (4, 2)]:
                out.append((bits, group, n, HIDDEN, False, cfg(HIDDEN, bn, 128, 4, split, False)))
    return out


def ab_variants() -> list[tuple]:
    """The default config of every expert/attention matrix of each format, its x16 twin, and x16 with twice
    the rows per program or twice the warps (x at 16 bits frees registers)."""
    out = []
    for bits, group, _ in FORMATS[:4]:
        attention = ((6144, HIDDEN, False), (HIDDEN, HIDDEN, False)) if (bits, group) == (4, 64) else ()  # stacked qkv, o
        for n, k, gated in ((FFN, HIDDEN, True), (HIDDEN, FFN, False)) + attention:
            cfg = Q._gemv_config(bits, group, n, k, gated)
            out += [(bits, group, n, k, gated, c) for c in
                    (cfg, cfg._replace(x16=True), cfg._replace(x16=True, bn=2 * cfg.bn), cfg._replace(x16=True, warps=2 * cfg.warps))]
    return out


def _compile_one(v: tuple) -> str:
    """Worker: run a variant once so Triton's on-disk cache holds its binary."""
    bits, group, n, k, gated, cfg = v
    try:
        Q.GEMV_OVERRIDES[(bits, group, n, k, gated)] = cfg
        qt = rand_qt(n, k, bits, group, group == 16)  # g16: the 4/2 preset, 8-bit metadata
        x = torch.randn(1, k, device="cuda").bfloat16()
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        gemv_call(x, y, qt, qt if gated else None)()
        torch.cuda.synchronize()
        return "ok"
    except Exception as e:  # reported in the table
        return f"{type(e).__name__}: {e}"[:300]


def precompile(variants: list[tuple], jobs: int) -> dict:
    t = time.perf_counter()
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
        status = dict(zip(variants, pool.map(_compile_one, variants)))
    print(f"precompiled {len(variants)} variants in {time.perf_counter() - t:.0f} s", flush=True)
    return status


def variant_error(x, y, qt: QuantizedTensor, qt2: QuantizedTensor | None) -> float:
    """Relative error of one call against dequantize-then-matmul in float32 (every variant is checked)."""
    from moe_offload.quant.hqq import dequantize

    gemv_call(x, y, qt, qt2)()
    ref = x.float() @ dequantize(qt).T
    if qt2 is not None:
        ref = F.silu(ref) * (x.float() @ dequantize(qt2).T)
    return ((y.float() - ref).norm() / ref.norm()).item()


def run_sweep(l2: int, d2d: float, jobs: int, results: dict, ab: bool = False) -> None:
    variants = ab_variants() if ab else sweep_variants()
    status = precompile(variants, jobs)
    rows = []
    pools: dict = {}
    best: dict = {}
    for v in variants:
        bits, group, n, k, gated, cfg = v
        if status[v] != "ok":
            rows.append({"variant": list(map(str, v)), "error": status[v]})
            print("FAILED", v, status[v], flush=True)
            continue
        key = (bits, group, n, k)
        if key not in pools:
            pools.clear()
            one = rand_qt(n, k, bits, group, group == 16)
            r = sets_needed(one.nbytes, l2)
            pools[key] = [one] + [rand_qt(n, k, bits, group, group == 16, seed=i) for i in range(1, r + 1)]
        qts = pools[key]
        Q.GEMV_OVERRIDES[(bits, group, n, k, gated)] = cfg
        x = torch.randn(1, k, device="cuda").bfloat16()
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        if gated:
            calls = [gemv_call(x, y, qts[i], qts[i + 1]) for i in range(0, len(qts) - 1, 2)]
            nbytes = 2 * qts[0].nbytes
        else:
            calls = [gemv_call(x, y, qt) for qt in qts]
            nbytes = qts[0].nbytes
        t = graph_time(calls)
        err = variant_error(x, y, qts[0], qts[1] if gated else None)
        row = {"bits": bits, "group": group, "n": n, "k": k, "gated": gated, "config": list(cfg), "us": t * 1e6,
               "GBps": nbytes / t / 1e9, "pct_d2d": 100 * nbytes / t / d2d, "rel_err": err}
        rows.append(row)
        print(f"sweep {bits}b g{group} {n}x{k} gated={gated} cfg={tuple(cfg)}: {t * 1e6:7.1f} us {row['pct_d2d']:5.1f}%"
              f" err {err:.1e}", flush=True)
        bkey = (bits, group, n, k, gated)
        if err < 1e-2 and (bkey not in best or t < best[bkey][1]):
            best[bkey] = (cfg, t)
        del Q.GEMV_OVERRIDES[(bits, group, n, k, gated)]
    pools.clear()
    for bkey, (cfg, _) in best.items():
        Q.GEMV_OVERRIDES[bkey] = cfg
    results["sweep"] = rows
    results["best_configs"] = [{"key": list(k), "config": list(c)} for k, (c, _) in best.items()]


# ------------------------------------------------------------------------------------------ tables


def bench_matrices(l2: int, d2d: float) -> list[dict]:
    rows = []
    for bits, group, qmeta in FORMATS:
        for n, k in SHAPES:
            one = rand_qt(n, k, bits, group, qmeta)
            qts = [one] + [rand_qt(n, k, bits, group, qmeta, seed=i) for i in range(1, sets_needed(one.nbytes, l2))]
            x = torch.randn(1, k, device="cuda").bfloat16()
            y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
            t = graph_time([gemv_call(x, y, qt) for qt in qts])
            cfg = Q._gemv_config(bits, group, n, k, False)
            rows.append({"kind": "matrix", "bits": bits, "group": group, "quant_meta": qmeta, "n": n, "k": k, "config": cfg,
                         "us": t * 1e6, "bytes": one.nbytes, "GBps": one.nbytes / t / 1e9, "pct_d2d": 100 * one.nbytes / t / d2d})
            del qts
    return rows


def expert_pool(bits: int, group: int, qmeta: bool, l2: int) -> tuple[list[tuple], int]:
    """Random Mixtral experts (gate, up, down): at least 16 and at least 4x the L2 in all; and bytes per expert."""
    experts: list[tuple] = []
    nbytes = 0
    while len(experts) < 16 or nbytes * len(experts) < 4 * l2:
        s = 3 * len(experts)
        e = (rand_qt(FFN, HIDDEN, bits, group, qmeta, s), rand_qt(FFN, HIDDEN, bits, group, qmeta, s + 1),
             rand_qt(HIDDEN, FFN, bits, group, qmeta, s + 2))
        nbytes = sum(q.nbytes for q in e)
        experts.append(e)
    return experts, nbytes


def bench_experts(l2: int, d2d: float) -> list[dict]:
    rows = []
    for bits, group, qmeta in FORMATS:
        experts, nbytes = expert_pool(bits, group, qmeta, l2)
        x = torch.randn(1, HIDDEN, device="cuda").bfloat16()
        h = torch.empty(1, FFN, device="cuda", dtype=torch.bfloat16)
        y = torch.empty(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
        fused = [lambda e=e: Q.expert_forward(x, *e, out=y, hidden=h) for e in experts]
        a = torch.empty(1, FFN, device="cuda", dtype=torch.bfloat16)

        def three(e):  # gate, up, down as three GEMVs plus torch's silu * up
            def f():
                Q.quant_matmul(x, e[0].qweight, e[0].scale, e[0].zero, bits, group, FFN, HIDDEN, out=a)
                Q.quant_matmul(x, e[1].qweight, e[1].scale, e[1].zero, bits, group, FFN, HIDDEN, out=h)
                torch.mul(F.silu(a), h, out=h)
                Q.quant_matmul(h, e[2].qweight, e[2].scale, e[2].zero, bits, group, HIDDEN, FFN, out=y)
            return f

        for name, calls in (("expert_fused_gate_up", fused), ("expert_3_gemv", [three(e) for e in experts])):
            t = graph_time(calls)
            rows.append({"kind": name, "bits": bits, "group": group, "quant_meta": qmeta, "us": t * 1e6, "bytes": nbytes,
                         "GBps": nbytes / t / 1e9, "pct_d2d": 100 * nbytes / t / d2d})
        del experts
    return rows


def bench_baselines(l2: int, d2d: float) -> list[dict]:
    rows = []
    x = torch.randn(1, HIDDEN, device="cuda").bfloat16()
    # bf16 F.linear: one matrix and a whole expert
    ws = [torch.randn(FFN, HIDDEN, device="cuda").bfloat16() for _ in range(16)]
    t = graph_time([lambda w=w: F.linear(x, w) for w in ws])
    nb = ws[0].numel() * 2
    rows.append({"kind": "bf16_linear", "n": FFN, "k": HIDDEN, "us": t * 1e6, "bytes": nb, "GBps": nb / t / 1e9, "pct_d2d": 100 * nb / t / d2d})
    del ws
    ex = [(torch.randn(FFN, HIDDEN, device="cuda").bfloat16(), torch.randn(FFN, HIDDEN, device="cuda").bfloat16(),
           torch.randn(HIDDEN, FFN, device="cuda").bfloat16()) for _ in range(16)]
    t = graph_time([lambda e=e: F.linear(F.silu(F.linear(x, e[0])) * F.linear(x, e[1]), e[2]) for e in ex])
    nb = 3 * FFN * HIDDEN * 2
    rows.append({"kind": "bf16_expert", "us": t * 1e6, "bytes": nb, "GBps": nb / t / 1e9, "pct_d2d": 100 * nb / t / d2d})
    del ex
    # torch's int4 tinygemm
    for group in (64, 128):
        try:
            def tg(n, k, seed):
                gen = torch.Generator(device="cuda").manual_seed(seed)
                q = torch.randint(0, 16, (n, k), device="cuda", generator=gen, dtype=torch.int32)
                u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
                packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
                sz = torch.rand(k // group, n, 2, device="cuda", generator=gen).bfloat16()
                return packed, sz, n * k // 2 + sz.numel() * 2

            mats = [tg(FFN, HIDDEN, i) for i in range(16)]
            t = graph_time([lambda p=p: torch.ops.aten._weight_int4pack_mm(x, p[0], group, p[1]) for p in mats])
            nb = mats[0][2]
            rows.append({"kind": "tinygemm_int4", "group": group, "n": FFN, "k": HIDDEN, "us": t * 1e6, "bytes": nb,
                         "GBps": nb / t / 1e9, "pct_d2d": 100 * nb / t / d2d})
            del mats
            exs = [(tg(FFN, HIDDEN, 3 * i), tg(FFN, HIDDEN, 3 * i + 1), tg(HIDDEN, FFN, 3 * i + 2)) for i in range(16)]

            def texp(e):
                a = torch.ops.aten._weight_int4pack_mm(x, e[0][0], group, e[0][1])
                b = torch.ops.aten._weight_int4pack_mm(x, e[1][0], group, e[1][1])
                return torch.ops.aten._weight_int4pack_mm(F.silu(a) * b, e[2][0], group, e[2][1])

            t = graph_time([lambda e=e: texp(e) for e in exs])
            nb = sum(p[2] for p in exs[0])
            rows.append({"kind": "tinygemm_int4_expert", "group": group, "us": t * 1e6, "bytes": nb, "GBps": nb / t / 1e9,
                         "pct_d2d": 100 * nb / t / d2d})
            del exs
        except Exception as e:  # noqa: BLE001 - report, keep going
            rows.append({"kind": "tinygemm_int4", "group": group, "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


def bench_batches() -> list[dict]:
    """M > 1 on the 14336x4096 matrix: GEMV vs tiled GEMM vs dequantize+cuBLAS vs bf16 cuBLAS."""
    rows = []
    w16 = torch.randn(FFN, HIDDEN, device="cuda").bfloat16()
    for bits, group, _ in SWEEP_FORMATS:
        qts = [rand_qt(FFN, HIDDEN, bits, group, seed=i) for i in range(8)]
        ws = [Q._weight(q.qweight, q.scale, q.zero, bits, group, FFN, HIDDEN) for q in qts]
        scratch = torch.empty(FFN, HIDDEN, device="cuda", dtype=torch.bfloat16)
        for m in (1, 2, 4, 8, 16, 64, 256, 1024, 4096):
            x = torch.randn(m, HIDDEN, device="cuda").bfloat16()
            y = torch.empty(m, FFN, device="cuda", dtype=torch.bfloat16)
            paths: dict[str, list] = {}
            if m <= 8:
                paths["gemv"] = [lambda w=w: Q._launch_gemv(x, y, bits, group, FFN, HIDDEN, w) for w in ws]
            if m <= 4096:
                paths["gemm"] = [lambda w=w: Q._launch_gemm(x, y, bits, group, FFN, HIDDEN, w) for w in ws]
            if m >= 16:
                def dq(w):
                    def f():
                        Q._launch_dequant(scratch, bits, group, FFN, HIDDEN, w)
                        torch.matmul(x, scratch.t(), out=y)
                    return f
                paths["dequant_cublas"] = [dq(w) for w in ws]
                paths["bf16_cublas"] = [lambda: torch.matmul(x, w16.t(), out=y)]
            for name, calls in paths.items():
                t = graph_time(calls, reps=5)
                rows.append({"kind": "batch", "path": name, "bits": bits, "group": group, "m": m, "us": t * 1e6,
                             "TFLOPs": 2 * m * FFN * HIDDEN / t / 1e12})
                print(f"batch {bits}b g{group} m={m:5d} {name:15s} {t * 1e6:9.1f} us", flush=True)
    return rows


def host_overhead() -> dict:
    qt = rand_qt(FFN, HIDDEN, 4, 64)
    x = torch.randn(1, HIDDEN, device="cuda").bfloat16()
    y = torch.empty(1, FFN, device="cuda", dtype=torch.bfloat16)
    args = (qt.qweight, qt.scale, qt.zero, 4, 64, FFN, HIDDEN)
    Q.quant_matmul(x, *args, out=y)
    torch.cuda.synchronize()
    n = 300
    t = time.perf_counter()
    for _ in range(n):
        Q.quant_matmul(x, *args, out=y)
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return {"eager_host_us_per_call": host * 1e6}


def kernel_resources() -> list[dict]:
    """Registers/spills of the compiled GEMV variants (from Triton's in-memory cache)."""
    out = []
    try:
        for cache in Q._gemv_kernel.device_caches.values():
            for key, k in cache[0].items():
                out.append({"key": str(key)[:400], "n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None)})
    except Exception as e:  # noqa: BLE001 - informational only
        out.append({"error": str(e)})
    return out


def one(spec: str) -> None:
    """Run one GEMV variant eagerly (for a profiler): bits,group,n,k,gated,bn,bk,warps,split,prefetch,maxnreg,one_word."""
    v = [int(t) for t in spec.split(",")]
    bits, group, n, k, gated = v[:5]
    Q.GEMV_OVERRIDES[(bits, group, n, k, bool(gated))] = Q.GemvConfig(*v[5:9], bool(v[9]), v[10] or None, bool(v[11]))
    qts = [rand_qt(n, k, bits, group, seed=i) for i in range(8)]
    x = torch.randn(1, k, device="cuda").bfloat16()
    y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
    for i in range(8):
        gemv_call(x, y, qts[i], qts[(i + 1) % 8] if gated else None)()
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", help="run one GEMV variant for a profiler and exit")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--ab", action="store_true", help="sweep only the default configs against their x16 twins")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--json", default="kernels.json")
    ap.add_argument("--skip", default="", help="comma-separated: matrices,experts,baselines,batches")
    args = ap.parse_args()
    if args.one:
        return one(args.one)
    skip = set(filter(None, args.skip.split(",")))
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    results: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": props.name,
                     "torch": torch.__version__, "triton": __import__("triton").__version__, "l2_bytes": l2}
    d2d = d2d_bandwidth()
    results["d2d_GBps"] = d2d / 1e9
    print(f"{props.name}: D2D copy {d2d / 1e9:.0f} GB/s, L2 {l2 >> 20} MiB", flush=True)
    sections = [("sweep", lambda: run_sweep(l2, d2d, args.jobs, results, args.ab)) if args.sweep or args.ab else None,
                ("matrices", lambda: results.__setitem__("matrices", bench_matrices(l2, d2d))),
                ("experts", lambda: results.__setitem__("experts", bench_experts(l2, d2d))),
                ("baselines", lambda: results.__setitem__("baselines", bench_baselines(l2, d2d))),
                ("batches", lambda: results.__setitem__("batches", bench_batches())),
                ("host", lambda: results.__setitem__("host", host_overhead()))]
    for name, fn in filter(None, sections):
        if name in skip:
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception:  # noqa: BLE001 - keep the other sections' numbers
            import traceback

            results.setdefault("errors", {})[name] = traceback.format_exc()
            print(f"section {name} FAILED:\n{results['errors'][name]}", flush=True)
        print(f"section {name}: {time.perf_counter() - t:.0f} s", flush=True)
    results["resources"] = kernel_resources()
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)

    host = results.get("host", {}).get("eager_host_us_per_call", float("nan"))
    print(f"\n{results['date']}  {props.name}  D2D {d2d / 1e9:.0f} GB/s  eager host {host:.0f} us/call")
    print(f"{'what':24s} {'fmt':12s} {'shape':12s} {'us':>8s} {'GB/s':>7s} {'%D2D':>6s}")
    for r in results.get("matrices", []) + results.get("experts", []) + results.get("baselines", []):
        if "error" in r:
            print(f"{r['kind']:24s} error: {r['error'][:80]}")
            continue
        fmt = f"{r['bits']}b g{r['group']}{' qm' if r.get('quant_meta') else ''}" if "bits" in r else (f"int4 g{r['group']}" if "group" in r else "bf16")
        shape = f"{r['n']}x{r['k']}" if "n" in r else "expert"
        print(f"{r['kind']:24s} {fmt:12s} {shape:12s} {r['us']:8.1f} {r['GBps']:7.0f} {r['pct_d2d']:6.1f}")


if __name__ == "__main__":
    main()
