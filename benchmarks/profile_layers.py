"""Host time per decode token, phase by phase, for offloaded decode (inclusive wall times of the main thread's calls).

cProfile distorts Python-heavy paths; this wraps a few methods with perf_counter instead. Usage (GPU machine):
    python3 benchmarks/profile_layers.py --gpu-memory 12GiB [--hybrid on] [--split] [--int8] [--steps 64]
        [--cpu-layers N [--cpu-alone] [--stage]]
"""

import argparse
import time
from collections import defaultdict

import torch

from moe_offload import grouped, weights
from moe_offload.engine import load_synthetic
from moe_offload.offload import cache as cache_mod, experts as experts_mod, hybrid as hybrid_mod
from moe_offload.placement import OffloadOptions

TIMES: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(owner, name: str, label: str | None = None) -> None:
    original = getattr(owner, name)
    label = label or f"{owner.__name__}.{name}"

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES[label] += time.perf_counter() - start
            CALLS[label] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu-memory", default="12GiB")
    ap.add_argument("--hybrid", default="off")
    ap.add_argument("--split", action="store_true")
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--cpu-layers", type=int, default=0)
    ap.add_argument("--cpu-alone", action="store_true", help="CPU layers compute all their experts (no copies)")
    ap.add_argument("--stage", action="store_true", help="CPU layers stage a guess for the next one (opt-in)")
    args = ap.parse_args()
    hybrid = "auto" if args.cpu_layers and args.hybrid == "off" else args.hybrid
    engine = load_synthetic("mixtral-8x7b", preset="4/2", device="cuda", max_context=1024, int8_activations=args.int8,
                            offload=OffloadOptions(gpu_memory=args.gpu_memory, hybrid=hybrid, split=args.split,
                                                   cpu_layers=args.cpu_layers,
                                                   cpu_layer_copies=False if args.cpu_alone else None,
                                                   stage_cpu_guess=args.stage))
    for block in engine.model.moe_blocks():  # the combine each layer was given (a function, not a method)
        experts = block.experts
        if hasattr(experts, "combine"):
            original = experts.combine
            holder = type("Combine", (), {"combine": staticmethod(original), "__name__": "combine_experts"})
            timed(holder, "combine")
            experts.combine = holder.combine
    timed(torch.Tensor, "tolist", "Tensor.tolist (host syncs)")
    for owner, name in ((experts_mod.OffloadedExperts, "__call__"), (cache_mod.ExpertCache, "load"),
                        (cache_mod.ExpertCache, "stage"), (cache_mod.ExpertCache, "account_log"),
                        (hybrid_mod.HybridExecutor, "cpu_layer_share"), (hybrid_mod.HybridExecutor, "_run"),
                        (hybrid_mod.HybridExecutor, "host_input"),
                        (cache_mod.ExpertCache, "load_split"), (cache_mod.ExpertCache, "module"),
                        (cache_mod.ExpertCache, "split_module"), (cache_mod.ExpertCache, "prefetch"),
                        (hybrid_mod.HybridExecutor, "choose"), (hybrid_mod.HybridExecutor, "submit"),
                        (hybrid_mod.HybridExecutor, "submit_heads"), (hybrid_mod.CpuResults, "_get"),
                        (weights.QuantExpert, "forward_with_head"), (torch.cuda.CUDAGraph, "replay"),
                        (grouped.SlotKernel, "mixed"), (grouped.SlotKernel, "__call__"),
                        (experts_mod.OffloadedExperts, "decode_prologue")):
        timed(owner, name)
    session = engine.new_session()
    logits, _ = session.prefill(list(range(3, 67)))
    token = int(logits.argmax())
    for _ in range(32):
        token = int(session.step(token).argmax())
    TIMES.clear()
    CALLS.clear()
    engine.cache_stats.reset()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        token = int(session.step(token).argmax())
    torch.cuda.synchronize()
    total = (time.perf_counter() - start) / args.steps * 1e3
    s = engine.cache_stats.summary()
    print(f"hybrid {hybrid}{' split' if args.split else ''}, {args.cpu_layers} CPU layers"
          f"{' alone' if args.cpu_alone else ''}{' staged guess' if args.stage else ''}: {total:.1f} ms/token; hit rate "
          f"{s['hit_rate']:.2f}, CPU experts {s['cpu_experts_per_token']:.1f} + split {s['split_experts_per_token']:.1f} "
          f"per token, CPU {s['cpu_ms_per_token']:.1f} ms, CPU wait {s['cpu_wait_ms_per_token']:.1f} ms, "
          f"{s['bytes_copied_per_token'] / 2**20:.0f} MiB copied")
    if engine.hybrid is not None:
        c = engine.hybrid.cost
        print(f"  cost model: copy {c.copy_ms:.3f} ms/expert; CPU {c.cpu_fixed_ms:.3f} ms/call + {c.cpu_ms:.3f} ms/expert")
    for label in sorted(TIMES, key=TIMES.get, reverse=True):
        print(f"  {label:<36} {TIMES[label] / args.steps * 1e3:7.2f} ms/token  {CALLS[label] / args.steps:6.1f} calls")


if __name__ == "__main__":
    main()
