"""One Mixtral-8x7B expert at batch 1 on the CPU, per kernel, bit width and thread count, beside the
host-to-device copy of the same expert: the numbers the hybrid path's choice of CPU kernel rests on.

    PYTHONPATH=. python benchmarks/cpu_experts.py [--threads 15 16] [--json out.json]

Rotates over several experts (more data than the CPU caches) so the numbers are memory, not cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moe_offload.config import ModelConfig
from moe_offload.cpu_expert import CpuExpert
from moe_offload.flat import FlatLayout
from moe_offload.quant.presets import make_preset
from moe_offload.synthetic import synthetic_config
from moe_offload.weights import expert_layout


def random_expert_buffers(config: ModelConfig, spec, count: int, layout: FlatLayout) -> list[torch.Tensor]:
    """Expert buffers with random codes and plausible scales (speed does not depend on the values)."""
    out = []
    for _ in range(count):
        buf = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        for name, view in layout.views(buf).items():
            if view.dtype == torch.int32:
                view.copy_(torch.randint(-2**31, 2**31 - 1, view.shape, dtype=torch.int32))
            elif view.dtype == torch.uint8:
                view.copy_(torch.randint(0, 256, view.shape, dtype=torch.uint8))
            else:
                view.copy_(torch.rand(view.shape) * 0.01)
        out.append(buf)
    return out


def time_ms(fn, repeats: int) -> float:
    fn(0)
    samples = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[15, 16])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args()
    config = synthetic_config("mixtral-8x7b")
    rows = []
    for preset_name in ("4/2", "4/3", "4/4"):
        preset = make_preset(preset_name)
        spec = preset.experts
        layout = expert_layout(config, preset, torch.bfloat16)
        buffers = random_expert_buffers(config, spec, args.experts, layout)
        copy_ms = None
        if torch.cuda.is_available():
            dst = torch.empty(layout.nbytes, dtype=torch.uint8, device="cuda")
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            samples = []
            for i in range(args.repeats):
                begin.record()
                dst.copy_(buffers[i % len(buffers)], non_blocking=True)
                end.record()
                end.synchronize()
                samples.append(begin.elapsed_time(end))
            copy_ms = statistics.median(samples[1:])
        x = torch.randn(1, config.hidden_size)
        for kernel in ("hqq", "hqq-f32", "int4"):
            try:
                experts = [CpuExpert(layout.views(b), config, spec, kernel) for b in buffers]
            except Exception as e:  # e.g. int4 with group 16
                print(f"{preset_name} {kernel}: n/a ({e})")
                continue
            for threads in args.threads:
                torch.set_num_threads(threads)
                ms = time_ms(lambda i: experts[i % len(experts)](x, threads), args.repeats)
                row = {"preset": preset_name, "bits": spec.bits, "group": spec.group_size, "kernel": kernel,
                       "threads": threads, "cpu_ms": ms, "expert_bytes": layout.nbytes,
                       "cpu_gb_s": layout.nbytes / ms / 1e6, "copy_ms": copy_ms}
                rows.append(row)
                print(f"{preset_name} {kernel:5s} threads={threads:2d}: {ms:6.2f} ms/expert "
                      f"({row['cpu_gb_s']:.1f} GB/s of packed expert), copy {copy_ms or 0:.2f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
