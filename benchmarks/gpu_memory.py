"""Where a run's GPU memory goes, as nvidia-smi counts it (total - free) against PyTorch's allocator.

Usage (GPU machine): python3 benchmarks/gpu_memory.py [--gpu-memory 12GiB] [--max-context 1024]
Prints, per stage, device memory in use (total - free), the allocator's reserved and allocated bytes, and the
rest: what the planner must budget beyond the tensors it counts (CUDA context, loaded kernels, library workspaces).
"""

import argparse

import torch

from moe_offload.engine import load_synthetic
from moe_offload.placement import OffloadOptions


def report(stage: str) -> None:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    used, reserved, allocated = total - free, torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
    peak = torch.cuda.max_memory_allocated()
    print(f"{stage:28s} used {used / 2**30:6.2f} GiB  reserved {reserved / 2**30:6.2f}  allocated {allocated / 2**30:6.2f}"
          f"  peak alloc {peak / 2**30:6.2f}  outside allocator {(used - reserved) / 2**30:5.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="mixtral-8x7b")
    ap.add_argument("--preset", default="4/2")
    ap.add_argument("--gpu-memory", default="12GiB")
    ap.add_argument("--max-context", type=int, default=1024)
    args = ap.parse_args()
    torch.zeros(1, device="cuda")
    report("context")
    engine = load_synthetic(args.synthetic, preset=args.preset, device="cuda", max_context=args.max_context,
                            offload=OffloadOptions(gpu_memory=args.gpu_memory, hybrid="off"))
    report("loaded")
    session = engine.new_session()
    report("session (graphs captured)")
    logits, _ = session.prefill(list(range(3, 515)))
    report("prefill 512")
    token = int(logits.argmax())
    for _ in range(32):
        token = int(session.step(token).argmax())
    report("32 decode steps")


if __name__ == "__main__":
    main()
