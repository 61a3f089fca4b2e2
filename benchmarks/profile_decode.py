"""Where a decode step's time goes: torch.profiler over a few greedy steps of a synthetic model.

Usage (GPU machine): python3 benchmarks/profile_decode.py --synthetic mixtral-8x7b --preset 4/2 [--gpu-memory 12GiB]
"""

import argparse
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
    args = ap.parse_args()
    engine = load_synthetic(args.synthetic, preset=args.preset, device="cuda",
                            offload=OffloadOptions(gpu_memory=args.gpu_memory))
    session = engine.new_session()
    logits, _ = session.prefill(list(range(3, 67)))
    token = int(logits.argmax())
    for _ in range(8):  # warm
        token = int(session.step(token).argmax())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        token = int(session.step(token).argmax())
    torch.cuda.synchronize()
    print(f"{args.gpu_memory or 'resident'}: {(time.perf_counter() - t0) / args.steps * 1e3:.1f} ms/token unprofiled")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            token = int(session.step(token).argmax())
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50)
    print(table)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
