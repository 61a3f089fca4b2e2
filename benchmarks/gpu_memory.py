"""Where a run's GPU memory goes, as nvidia-smi counts it (total - free) against PyTorch's allocator.

Usage (GPU machine): python3 benchmarks/gpu_memory.py [--gpu-memory 12GiB] [--cpu-layers N|auto] [--max-context 1024]
[--json FILE]
Prints, per stage, device memory in use (total - free), the allocator's reserved and allocated bytes, and the
rest: what the planner must budget beyond the tensors it counts (CUDA context, loaded kernels, library workspaces).
A thread samples total - free every 2 ms, so the peak of a prefill is caught, not only the stage ends. Run it under
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to see what the allocator's own slack costs.
"""

import argparse
import json
import os
import threading
import time

import torch

from moe_offload.engine import load_synthetic
from moe_offload import placement
from moe_offload.placement import OffloadOptions, parse_cpu_layers

GiB = 2**30


class Sampler(threading.Thread):
    """The device's memory in use (total - free), sampled until stopped; ``peak`` is the largest seen."""

    def __init__(self, period_s: float = 0.002):
        super().__init__(daemon=True)
        self.period_s, self.peak, self._halt = period_s, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(self.period_s)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return self.peak


def report(stage: str, rows: list[dict]) -> None:
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    row = dict(stage=stage, used=total - free, reserved=torch.cuda.memory_reserved(),
               allocated=torch.cuda.memory_allocated(), peak_allocated=torch.cuda.max_memory_allocated(),
               peak_reserved=torch.cuda.max_memory_reserved())
    rows.append(row)
    print(f"{stage:28s} used {row['used'] / GiB:6.2f} GiB  reserved {row['reserved'] / GiB:6.2f}  allocated "
          f"{row['allocated'] / GiB:6.2f}  peak alloc {row['peak_allocated'] / GiB:6.2f}  peak reserved "
          f"{row['peak_reserved'] / GiB:6.2f}  outside allocator {(row['used'] - row['reserved']) / GiB:5.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="mixtral-8x7b")
    ap.add_argument("--preset", default="4/2")
    ap.add_argument("--gpu-memory", default="12GiB")
    ap.add_argument("--cpu-layers", default="0")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--max-context", type=int, default=1024)
    ap.add_argument("--int8", action="store_true")
    ap.add_argument("--slack-mib", type=int, help="plan with this runtime slack instead of placement.RUNTIME_SLACK")
    ap.add_argument("--workspace-mib", type=int, help="plan with this workspace instead of placement.WORKSPACE_BYTES")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.slack_mib is not None:
        placement.RUNTIME_SLACK = args.slack_mib << 20
    if args.workspace_mib is not None:
        placement.WORKSPACE_BYTES = args.workspace_mib << 20
    rows: list[dict] = []
    torch.zeros(1, device="cuda")
    report("context", rows)
    sampler = Sampler()
    sampler.start()
    engine = load_synthetic(args.synthetic, preset=args.preset, device="cuda", max_context=args.max_context,
                            int8_activations=args.int8,
                            offload=OffloadOptions(gpu_memory=args.gpu_memory, policy=args.policy,
                                                   cpu_layers=parse_cpu_layers(args.cpu_layers)))
    report("loaded", rows)
    static = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()  # from here on: the working peak of a session, a prefill and decode
    session = engine.new_session()
    report("session (graphs captured)", rows)
    logits, _ = session.prefill(list(range(3, 515)))
    report("prefill 512", rows)
    token = int(logits.argmax())
    for _ in range(32):
        token = int(session.step(token).argmax())
    report("32 decode steps", rows)
    peak = sampler.stop()
    plan = engine.plan
    print(plan)
    summary = dict(alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), gpu_memory=args.gpu_memory,
                   slack=placement.RUNTIME_SLACK, workspace=placement.WORKSPACE_BYTES,
                   cpu_layers=plan.cpu_layers if plan else 0, context=rows[0]["used"], peak_used=peak,
                   planned=plan.used_bytes if plan else None, runtime_planned=plan.runtime_bytes if plan else None,
                   workspace_planned=plan.workspace_bytes if plan else None,
                   working_peak=max(r["peak_allocated"] for r in rows[2:]) - static,  # peaks reset after loading
                   reserved_beyond_allocated=max(r["peak_reserved"] for r in rows) - max(r["peak_allocated"] for r in rows),
                   rows=rows)
    print(f"peak in use (sampled) {peak / GiB:.3f} GiB; planned {summary['planned'] / GiB:.3f} GiB; allocations beyond "
          f"the loaded model at peak {summary['working_peak'] / GiB:.3f} GiB; allocator reserve beyond its peak "
          f"allocation {summary['reserved_beyond_allocated'] / GiB:.3f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
