"""Can the grouped expert kernels read an expert straight from pinned host memory (zero-copy over PCIe)?

One Mixtral-8x7B expert (4/2 or 4/3) at batch 1, three ways, each over enough distinct experts that no cache holds
them: (a) resident in GPU memory, (b) read in place from pinned host memory by the same kernel (the expert's index
in the stack points into host memory, which unified addressing maps), (c) an H2D copy into a slot, then (a).
Checks that (b) gives the same bits as (a). Prints one JSON line per case.

    PYTHONPATH=. python benchmarks/zero_copy.py [--presets 4/2,4/3] [--experts 16]
"""

from __future__ import annotations

import argparse
import json

import torch

from moe_offload import kernels
from moe_offload.offload.store import ExpertStore
from moe_offload.quant.presets import make_preset
from moe_offload.synthetic import random_quantized, synthetic_config
from moe_offload.weights import build_expert, expert_layout, expert_shapes


def events_ms(f, reps: int) -> float:
    f(0)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(reps):
        f(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--presets", default="4/2,4/3")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--reps", type=int, default=32)
    a = p.parse_args()
    dev = torch.device("cuda")
    config = synthetic_config("mixtral-8x7b")
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    for name in a.presets.split(","):
        preset = make_preset(name)
        layout = expert_layout(config, preset, torch.bfloat16)
        B, n = layout.nbytes, a.experts
        dstack = torch.empty((n, B), dtype=torch.uint8, device=dev)
        for e in range(n):
            flat = {}
            for proj, shape in expert_shapes(config).items():
                qt = random_quantized(shape, preset.experts, g, dev)
                flat.update({f"{proj}.{k}": t for k, t in qt.tensors().items()})
            layout.pack(flat, out=dstack[e])
        # the offload store, aligned to the stack as device lookup aligns it to the slots
        store = ExpertStore(layout, [(0, e) for e in range(n)], align_to=dstack.data_ptr())
        assert store.pinned
        for e in range(n):
            store.buffer((0, e)).copy_(dstack[e])
        where = [store.index_from((0, e), dstack.data_ptr()) for e in range(n)]
        base = build_expert(layout.views(dstack[0]), config, preset.experts)
        x = torch.randn(1, config.hidden_size, device=dev, dtype=torch.bfloat16)
        for int8 in (False, True):
            def run(ids):
                return kernels.grouped_expert_forward(x, ids, base.gate_proj.qt, base.up_proj.qt, base.down_proj.qt,
                                                      B, int8_activations=int8)
            dev_ids = [torch.tensor([e, (e + 1) % n], dtype=torch.int64, device=dev) for e in range(n)]
            host_ids = [torch.tensor([where[e], where[(e + 1) % n]], dtype=torch.int64, device=dev) for e in range(n)]
            same = all(torch.equal(run(dev_ids[e]), run(host_ids[e])) for e in range(n))
            slot = torch.empty((1, B), dtype=torch.uint8, device=dev)

            def copy_only(i):
                slot[0].copy_(store.buffer((0, i % n)), non_blocking=True)

            r = {"preset": name, "int8": int8, "expert_MB": B / 1e6, "host_equals_device": same,
                 "resident_2_experts_ms": events_ms(lambda i=0: run(dev_ids[i % n]), a.reps),
                 "zero_copy_2_experts_ms": events_ms(lambda i=0: run(host_ids[i % n]), a.reps),
                 "copy_1_expert_ms": events_ms(copy_only, a.reps)}
            one = [torch.tensor([where[e]], dtype=torch.int64, device=dev) for e in range(n)]
            r["zero_copy_1_expert_ms"] = events_ms(lambda i=0: run(one[i % n]), a.reps)
            r["zero_copy_GBps"] = B / r["zero_copy_1_expert_ms"] / 1e6
            r["copy_GBps"] = B / r["copy_1_expert_ms"] / 1e6
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
