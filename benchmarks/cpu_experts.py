"""One Mixtral-8x7B expert at batch 1 on the CPU, per kernel, bit width and thread count, beside the
host-to-device copy of the same expert: the numbers the hybrid path's choice of CPU kernel rests on.

    PYTHONPATH=. python benchmarks/cpu_experts.py [--threads 15 16] [--presets 4/2] [--prefetch 0 512]
        [--under-load] [--gap-ms 0.6] [--json out.json]

Rotates over several experts (more data than the CPU caches) so the numbers are memory, not cache.
``--under-load`` also times each kernel while a second thread keeps host-to-device copies of other experts
going on a CUDA stream (the hybrid path's situation: both read host memory at once), and reports the copies'
rate meanwhile. ``--gap-ms`` spins the calling thread that long between calls, as the host does while it waits for
the GPU between two CPU layers: what idle OpenMP workers cost to wake (OMP_WAIT_POLICY, GOMP_SPINCOUNT) shows then.
``--prefetch`` sweeps the 512-bit kernel's software prefetch distance (bytes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch

from moe_offload.config import ModelConfig
from moe_offload.cpu_expert import CpuExpert, run_experts
from moe_offload.flat import FlatLayout
from moe_offload.kernels import cpu as cpu_kernels
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


GAP_MS = 0.0  # --gap-ms


def time_ms(fn, repeats: int) -> float:
    fn(0)
    samples = []
    for i in range(repeats):
        if GAP_MS:
            until = time.perf_counter() + GAP_MS / 1e3
            while time.perf_counter() < until:
                pass
        start = time.perf_counter()
        fn(i)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


class CopyLoad:
    """Keeps H2D copies of the given pinned buffers going on a side stream from a second thread."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.buffers = buffers
        self.dst = torch.empty_like(buffers[0], device="cuda")
        self.stream = torch.cuda.Stream()
        self.stop = threading.Event()
        self.bytes = 0

    def _run(self) -> None:
        with torch.cuda.stream(self.stream):
            i = 0
            while not self.stop.is_set():
                self.dst.copy_(self.buffers[i % len(self.buffers)], non_blocking=True)
                self.stream.synchronize()
                self.bytes += self.dst.numel()
                i += 1

    def __enter__(self) -> "CopyLoad":
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.start = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.gb_s = self.bytes / (time.perf_counter() - self.start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[15, 16])
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=16)
    ap.add_argument("--presets", nargs="+", default=["4/2", "4/3", "4/4"])
    ap.add_argument("--kernels", nargs="+", default=["hqq", "hqq-avx2", "hqq-f32", "int4"])
    ap.add_argument("--prefetch", type=int, nargs="+", default=[0], help="software prefetch distances (bytes)")
    ap.add_argument("--under-load", action="store_true")
    ap.add_argument("--gap-ms", type=float, default=0.0, help="spin this long between calls (the host's GPU waits)")
    ap.add_argument("--json")
    args = ap.parse_args()
    global GAP_MS
    GAP_MS = args.gap_ms
    load = args.under_load and torch.cuda.is_available()
    config = synthetic_config("mixtral-8x7b")
    rows = []
    for preset_name in args.presets:
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
        other = random_expert_buffers(config, spec, 2, layout) if load else []  # what the copies carry
        for kernel in args.kernels:
            try:
                experts = [CpuExpert(layout.views(b), config, spec, kernel) for b in buffers]
            except Exception as e:  # e.g. int4 with group 16
                print(f"{preset_name} {kernel}: n/a ({e})")
                continue
            for threads in args.threads:
                torch.set_num_threads(threads)
                for prefetch in args.prefetch if kernel == "hqq" else [0]:
                    cpu_kernels.PREFETCH_BYTES = prefetch
                    run = lambda i: experts[i % len(experts)](x, threads)  # noqa: E731
                    ms = time_ms(run, args.repeats)
                    row = {"preset": preset_name, "bits": spec.bits, "group": spec.group_size, "kernel": kernel,
                           "threads": threads, "prefetch": prefetch, "cpu_ms": ms, "expert_bytes": layout.nbytes,
                           "cpu_gb_s": layout.nbytes / ms / 1e6, "copy_ms": copy_ms}
                    extra = ""
                    if load:
                        with CopyLoad(other) as copies:
                            row["cpu_ms_under_load"] = time_ms(run, args.repeats)
                        row["copy_gb_s_under_load"] = copies.gb_s
                        extra = f"; with copies running {row['cpu_ms_under_load']:6.2f} ms (copies {copies.gb_s:.1f} GB/s)"
                    rows.append(row)
                    print(f"{preset_name} {kernel:8s} threads={threads:2d} prefetch={prefetch:4d}: {ms:6.2f} ms/expert "
                          f"({row['cpu_gb_s']:.1f} GB/s of packed expert), copy {copy_ms or 0:.2f} ms{extra}", flush=True)
                    if kernel != "hqq" or experts[0].fused_parts() is None:
                        continue
                    # a layer's two experts in one C call (what the hybrid path runs), per expert
                    pair = lambda i: run_experts([experts[2 * i % len(experts)], experts[(2 * i + 1) % len(experts)]],  # noqa: E731
                                                 x, threads)
                    ms2 = time_ms(pair, args.repeats) / 2
                    rows.append(dict(row, kernel="hqq, 2 experts per call", cpu_ms=ms2,
                                     cpu_gb_s=layout.nbytes / ms2 / 1e6))
                    if load:
                        with CopyLoad(other) as copies:
                            rows[-1]["cpu_ms_under_load"] = time_ms(pair, args.repeats) / 2
                        rows[-1]["copy_gb_s_under_load"] = copies.gb_s
                    print(f"{preset_name} hqq, 2 experts per call, threads={threads:2d} prefetch={prefetch:4d}: {ms2:6.2f} "
                          f"ms/expert" + (f"; with copies running {rows[-1]['cpu_ms_under_load']:6.2f} ms (copies "
                                          f"{rows[-1]['copy_gb_s_under_load']:.1f} GB/s)" if load else ""), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
