"""Where a decode step's time goes: torch.profiler over a few greedy steps of a synthetic model.

Usage (GPU machine): python3 benchmarks/profile_decode.py --synthetic mixtral-8x7b --preset 4/2 [--gpu-memory 12GiB]
    [--cpu-layers N] [--hybrid on] [--split] [--int8] [--host]

``--host``: Python's cProfile instead, for the host's share of an offloaded step (per-layer routing syncs, cache
bookkeeping, the CPU path's hand-offs), sorted by own time; with ``--prefill N``, of one prefill.

``--prefill N --timeline``: where a prefill's copy link sits idle. The device trace of one prefill: the expert copies'
busy time, bytes and rate against the prefill's span, the largest idle gaps with the kernels around them, and the
link's rate for the same copies alone and beside a GEMM loop (what the link gives at all).
"""

import argparse
import cProfile
import json
import pstats
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moe_offload.engine import load_synthetic
from moe_offload.placement import OffloadOptions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="mixtral-8x7b")
    ap.add_argument("--preset", default="4/2")
    ap.add_argument("--gpu-memory", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--warm", type=int, default=8, help="decode steps before timing")
    ap.add_argument("--cpu-layers", default="0", help="a count, or auto")
    ap.add_argument("--hybrid", default=None, help="off/auto/on (default: auto with --cpu-layers, else off)")
    ap.add_argument("--split", action="store_true", help="with --hybrid on: split experts (opt-in)")
    ap.add_argument("--int8", action="store_true", help="int8 activations at decode")
    ap.add_argument("--host", action="store_true")
    ap.add_argument("--prefill", type=int, default=0, help="profile a prefill of this many tokens instead")
    ap.add_argument("--sort", default="tottime", help="cProfile order (--host): tottime or cumulative")
    ap.add_argument("--timeline", action="store_true", help="with --prefill: the copy link's idle gaps")
    ap.add_argument("--late-start", action="store_true",
                    help="with --prefill: no early copies (the model's before_forward hook off: the A/B of session 16)")
    ap.add_argument("--decode-first", type=int, default=0,
                    help="with --prefill: greedy decode steps before each timed prefill (as bench runs them)")
    args = ap.parse_args()
    args.cpu_layers = args.cpu_layers if args.cpu_layers == "auto" else int(args.cpu_layers)
    hybrid = args.hybrid or ("auto" if args.cpu_layers else "off")
    engine = load_synthetic(args.synthetic, preset=args.preset, device="cuda", max_context=args.max_context,
                            int8_activations=args.int8,
                            offload=OffloadOptions(gpu_memory=args.gpu_memory, cpu_layers=args.cpu_layers,
                                                   hybrid=hybrid, split=args.split))
    if args.prefill:
        if args.late_start:
            engine.model.before_forward = None
        prompt = [3 + (i * 7919) % 30000 for i in range(args.prefill)]
        for _ in range(2):  # compile and warm
            engine.new_session().prefill(prompt)

        def decode_first() -> None:
            if args.decode_first:
                s = engine.new_session()
                token = int(s.prefill(prompt[:16])[0].argmax())
                for _ in range(args.decode_first):
                    token = int(s.step(token).argmax())

        decode_first()
        rates = []
        for _ in range(3):
            session = engine.new_session()  # captures the decode graphs: outside the timed and profiled prefill
            decode_first()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            session.prefill(prompt)
            torch.cuda.synchronize()
            rates.append(args.prefill / (time.perf_counter() - t0))
        print(f"prefill {args.prefill}: {sorted(rates)[1]:.0f} tok/s unprofiled (median of {', '.join(f'{r:.0f}' for r in rates)})")
        free, total = torch.cuda.mem_get_info()
        cache = engine.expert_cache
        print(f"prefill ring: {len(cache._prefill_scratch) if cache else 0} slots; device memory in use (every process, "
              f"as nvidia-smi counts it): {(total - free) >> 20} MiB")
        if args.host:  # the host's share: prefill launches each expert's kernels eagerly, after each layer's sync
            session = engine.new_session()
            prof = cProfile.Profile()
            prof.enable()
            session.prefill(prompt)
            torch.cuda.synchronize()
            prof.disable()
            pstats.Stats(prof).sort_stats(args.sort).print_stats(30)
            return
        session = engine.new_session()
        decode_first()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            session.prefill(prompt)
            torch.cuda.synchronize()
        if args.timeline:
            copy_timeline(prof, engine.expert_cache.store.layout.nbytes)
            link_rate(engine)
            return
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        return
    session = engine.new_session()
    logits, _ = session.prefill(list(range(3, 67)))
    token = int(logits.argmax())
    for _ in range(args.warm):  # warm: kernels compiled, graphs captured, caches filled
        token = int(session.step(token).argmax())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        token = int(session.step(token).argmax())
    torch.cuda.synchronize()
    print(f"{args.gpu_memory or 'resident'}: {(time.perf_counter() - t0) / args.steps * 1e3:.1f} ms/token unprofiled")
    if engine.cache_stats is not None:
        s = engine.cache_stats.summary()
        print({k: round(v, 3) for k, v in s.items() if k in ("hit_rate", "cpu_experts_per_token", "split_experts_per_token",
                                                          "cpu_ms_per_token", "cpu_wait_ms_per_token", "copy_wait_ms",
                                                          "bytes_copied_per_token")})
    if engine.hybrid is not None:
        print(f"cost model: copy {engine.hybrid.cost.copy_ms:.3f} ms, CPU {engine.hybrid.cost.cpu_ms:.3f} ms per expert")
    if args.host:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            token = int(session.step(token).argmax())
        torch.cuda.synchronize()
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats(args.sort).print_stats(30)
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            token = int(session.step(token).argmax())
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50)
    print(table)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))


BIG_COPY = 1 << 20  # expert copies; the prefill's small uploads (token ids, positions) are left out


def copy_timeline(prof, expert_bytes: int) -> None:
    """The copy link's busy time and idle gaps over one profiled prefill (from the device trace)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    device = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    # A trace without byte counts: the copies that take long enough to be experts, each an expert's bytes.
    size = lambda e: e.get("args", {}).get("bytes", expert_bytes if e["dur"] >= 100 else 0)
    copies = sorted((e for e in device if e["cat"] == "gpu_memcpy" and "HtoD" in e["name"] and size(e) >= BIG_COPY),
                    key=lambda e: e["ts"])
    kernels = sorted((e for e in device if e["cat"] == "kernel"), key=lambda e: e["ts"])
    if not copies or not kernels:
        print("timeline: no expert copies in the trace")
        return
    start = min(e["ts"] for e in device)
    end = max(e["ts"] + e["dur"] for e in device)
    busy = sum(e["dur"] for e in copies)
    nbytes = sum(size(e) for e in copies)
    print(f"prefill span {(end - start) / 1e3:.1f} ms; {len(copies)} expert copies, {nbytes / 1e9:.2f} GB, busy "
          f"{busy / 1e3:.1f} ms ({busy / (end - start):.0%} of the span), {nbytes / busy / 1e3:.1f} GB/s while busy, "
          f"{nbytes / (end - start) / 1e3:.1f} GB/s over the span")
    print(f"before the first copy {(copies[0]['ts'] - start) / 1e3:.2f} ms; after the last "
          f"{(end - copies[-1]['ts'] - copies[-1]['dur']) / 1e3:.2f} ms")
    gaps = []
    for a, b in zip(copies, copies[1:]):
        gap = b["ts"] - (a["ts"] + a["dur"])
        if gap > 0:
            gaps.append((gap, a["ts"] + a["dur"], b["ts"]))
    total = sum(g for g, _, _ in gaps)
    print(f"idle between copies {total / 1e3:.1f} ms in {len(gaps)} gaps; sizes (us): "
          + ", ".join(f">{t}: {sum(g > t for g, _, _ in gaps)}" for t in (10, 100, 300, 1000)))
    for gap, a, b in sorted(gaps, reverse=True)[:8]:
        during = [k["name"][:40] for k in kernels if k["ts"] < b and k["ts"] + k["dur"] > a]
        print(f"  gap {gap / 1e3:.2f} ms at {(a - start) / 1e3:.1f} ms: kernels meanwhile {len(during)}, "
              f"e.g. {', '.join(dict.fromkeys(during))[:150] or 'none (the host)'}")


def link_rate(engine) -> None:
    """The copy link's rate for expert-sized pinned copies alone, and beside a GEMM loop on another stream."""
    cache = engine.expert_cache
    nbytes = cache.store.layout.nbytes if cache is not None else 64 << 20
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    copy_stream, gemm_stream = torch.cuda.Stream(), torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def rate(busy_gpu: bool) -> float:
        torch.cuda.synchronize()
        if busy_gpu:
            with torch.cuda.stream(gemm_stream):
                for _ in range(400):
                    a @ a
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(copy_stream):
            t0.record()
            for _ in range(32):
                dst.copy_(src, non_blocking=True)
            t1.record()
        torch.cuda.synchronize()
        return 32 * nbytes / t0.elapsed_time(t1) / 1e6

    rate(False)
    print(f"link: {nbytes / 2**20:.1f} MiB pinned copies alone {rate(False):.1f} GB/s, beside GEMMs {rate(True):.1f} GB/s")


if __name__ == "__main__":
    main()
