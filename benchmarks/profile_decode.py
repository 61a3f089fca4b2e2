"""Where a decode step's time goes: torch.profiler over a few greedy steps of a synthetic model.

Usage (GPU machine): python3 benchmarks/profile_decode.py --synthetic mixtral-8x7b --preset 4/2 [--gpu-memory 12GiB]
    [--cpu-layers N] [--hybrid on] [--split] [--int8] [--host]

``--host``: Python's cProfile instead, for the host's share of an offloaded step (per-layer routing syncs, cache
bookkeeping, the CPU path's hand-offs), sorted by own time; with ``--prefill N``, of one prefill.
"""

import argparse
import cProfile
import pstats
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
    ap.add_argument("--warm", type=int, default=8, help="decode steps before timing")
    ap.add_argument("--cpu-layers", type=int, default=0)
    ap.add_argument("--hybrid", default=None, help="off/auto/on (default: auto with --cpu-layers, else off)")
    ap.add_argument("--split", action="store_true", help="with --hybrid on: split experts (opt-in)")
    ap.add_argument("--int8", action="store_true", help="int8 activations at decode")
    ap.add_argument("--host", action="store_true")
    ap.add_argument("--prefill", type=int, default=0, help="profile a prefill of this many tokens instead")
    ap.add_argument("--sort", default="tottime", help="cProfile order (--host): tottime or cumulative")
    args = ap.parse_args()
    hybrid = args.hybrid or ("auto" if args.cpu_layers else "off")
    engine = load_synthetic(args.synthetic, preset=args.preset, device="cuda", max_context=1024,
                            int8_activations=args.int8,
                            offload=OffloadOptions(gpu_memory=args.gpu_memory, cpu_layers=args.cpu_layers,
                                                   hybrid=hybrid, split=args.split))
    if args.prefill:
        prompt = [3 + (i * 7919) % 30000 for i in range(args.prefill)]
        for _ in range(2):  # compile and warm
            engine.new_session().prefill(prompt)
        session = engine.new_session()  # captures the decode graphs: outside the timed and profiled prefill
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        session.prefill(prompt)
        torch.cuda.synchronize()
        print(f"prefill {args.prefill}: {args.prefill / (time.perf_counter() - t0):.0f} tok/s unprofiled")
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
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            session.prefill(prompt)
            torch.cuda.synchronize()
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


if __name__ == "__main__":
    main()
