"""Prefill with the prefill experts kernels (kernels/moe_gemm.py) against the older dequantize-then-cuBLAS path,
alternating in one process (one model, one machine state).

Usage (GPU machine): python3 benchmarks/prefill_ab.py [--gpu-memory 12GiB --cpu-layers 15] [--tokens 512] [--reps 3]
"""

import argparse
import json
import statistics
import time

import torch

from moe_offload.engine import load_synthetic
from moe_offload.kernels import moe_gemm
from moe_offload.placement import OffloadOptions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", default="mixtral-8x7b")
    ap.add_argument("--preset", default="4/2")
    ap.add_argument("--gpu-memory", default=None)
    ap.add_argument("--cpu-layers", default="0")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    cpu_layers = args.cpu_layers if args.cpu_layers == "auto" else int(args.cpu_layers)
    engine = load_synthetic(args.synthetic, preset=args.preset, device="cuda", max_context=1024, int8_activations=True,
                            offload=OffloadOptions(gpu_memory=args.gpu_memory, cpu_layers=cpu_layers,
                                                   hybrid="auto" if cpu_layers else "off"))
    prompt = [3 + (i * 7919) % 30000 for i in range(args.tokens)]

    def rate() -> float:
        session = engine.new_session()  # captures the decode graphs: not part of a prefill
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        session.prefill(prompt)
        torch.cuda.synchronize()
        return args.tokens / (time.perf_counter() - t0)

    results: dict[str, list[float]] = {"kernels": [], "dequantize": []}
    for mode in results:  # compile and warm both
        moe_gemm.ENABLED = mode == "kernels"
        rate(), rate()
    for _ in range(args.reps):
        for mode in results:
            moe_gemm.ENABLED = mode == "kernels"
            results[mode].append(rate())
    print(json.dumps({"gpu_memory": args.gpu_memory or "resident", "cpu_layers": args.cpu_layers,
                      **{m: round(statistics.median(v)) for m, v in results.items()},
                      "runs": {m: [round(r) for r in v] for m, v in results.items()}}), flush=True)


if __name__ == "__main__":
    main()
