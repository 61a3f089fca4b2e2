"""What leaner expert metadata would cost in quality: 2-bit experts with 4-bit scales and zeros (a script).

    PYTHONPATH=. python benchmarks/meta_bits_quality.py --text ../shared/data/text/wikitext-2-test.txt \
        [--tokens 20000] [--json out.json]

At ~2.5 GB every expert crosses PCIe once per prefill, so prefill speed there is bytes per expert (BENCHMARKS.md,
session 15). The 4/2 preset's experts are 2-bit codes in groups of 16 with 8-bit scales and zeros: a third of their
bytes is metadata. This scores candidate layouts on the demo model before any kernel is written: each one quantizes
every expert matrix with the package's HQQ quantizer (metadata re-quantized at ``meta_bits`` in blocks of
``meta_groups`` groups), dequantizes it back into the unquantized model (fake quantization: attention, router and
embeddings stay unquantized, so only the experts differ between rows) and reports WikiText-2 perplexity with
``moe_offload.evaluate.perplexity``, beside the bits per weight and MiB per expert the layout gives at Mixtral-8x7B's
shapes. Runs on a CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moe_offload.demo import demo_model_dir
from moe_offload.engine import load
from moe_offload.evaluate import perplexity
from moe_offload.quant import hqq

MIXTRAL_EXPERT = ((14336, 4096), (14336, 4096), (4096, 14336))  # w1, w3, w2: [N, K]


@dataclass(frozen=True)
class Layout:
    name: str
    group_size: int
    meta_bits: int | None  # None: float16 scales and zeros
    meta_groups: int = 128  # groups per metadata block (at most; the largest divisor of a row's groups)

    def expert_bytes(self) -> int:
        """Bytes of one Mixtral-8x7B expert in this layout (2-bit codes)."""
        total = 0
        for n, k in MIXTRAL_EXPERT:
            m = k // self.group_size
            total += n * k * 2 // 8
            if self.meta_bits is None:
                total += 2 * n * m * 2
            else:
                blocks = m // _block(m, self.meta_groups)
                total += 2 * (n * m * self.meta_bits // 8 + n * blocks * 2 * 2)  # codes + float16 step, offset
        return total


def _block(m: int, most: int) -> int:
    return max(d for d in range(1, min(m, most) + 1) if m % d == 0)


LAYOUTS = [
    Layout("4/2: group 16, 8-bit meta", 16, 8),
    Layout("group 16, 4-bit meta", 16, 4),
    Layout("group 16, 4-bit meta, blocks of 16 groups", 16, 4, 16),
    Layout("group 16, 6-bit meta", 16, 6),
    Layout("group 32, 8-bit meta", 32, 8),
    Layout("group 16, float16 meta", 16, None),
]


@contextmanager
def meta_format(bits: int, groups: int):
    """The quantizer's metadata at ``bits`` (codes still stored one per byte) in blocks of at most ``groups``."""
    levels = float(2**bits - 1)

    def quantize_meta(v: torch.Tensor, _bits: int = 8) -> hqq.QuantizedMeta:  # codes one per byte: any bits
        n, m = v.shape
        vb = v.reshape(n, m // _block(m, groups), -1)
        offset = hqq._f16_round(vb.amin(dim=-1), float("-inf"))
        step = hqq._f16_round((vb.amax(dim=-1) - offset.float()) / levels, float("inf"))
        step = torch.where(step == 0, torch.ones_like(step), step)
        q = torch.round((vb - offset.float()[..., None]) / step.float()[..., None]).clamp_(0, levels)
        return hqq.QuantizedMeta(q.to(torch.uint8).reshape(n, m), step, offset)

    saved = hqq._quantize_meta
    hqq._quantize_meta = quantize_meta
    try:
        yield
    finally:
        hqq._quantize_meta = saved


def fake_quantize_experts(model, layout: Layout) -> None:
    spec = hqq.QuantSpec(2, layout.group_size, quant_meta=layout.meta_bits is not None)
    with meta_format(layout.meta_bits or 8, layout.meta_groups):
        for block in model.moe_blocks():
            for expert in block.experts.experts:
                for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
                    w = linear.weight.data
                    linear.weight.data = hqq.dequantize(hqq.quantize(w, spec)).to(w.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=20000)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--json")
    args = ap.parse_args()
    model_dir = demo_model_dir()
    text = open(args.text, encoding="utf-8").read()
    rows = []
    for layout in [None, *LAYOUTS]:
        engine = load(model_dir, device="cpu", dtype="float32", max_context=args.context)
        if layout is not None:
            fake_quantize_experts(engine.model, layout)
        ids = engine.encode(text)[: args.tokens]
        result = perplexity(engine, ids, args.context, args.context // 2)
        mib = layout.expert_bytes() / 2**20 if layout else 336.0
        bits = (layout.expert_bytes() * 8 / sum(n * k for n, k in MIXTRAL_EXPERT)) if layout else 16.0
        rows.append({"layout": layout.name if layout else "unquantized", "perplexity": result.perplexity,
                     "mixtral_expert_mib": mib, "bits_per_weight": bits})
        print(f"{rows[-1]['layout']:<45} ppl {result.perplexity:8.2f}   Mixtral expert {mib:6.1f} MiB, "
              f"{bits:.3f} bits/weight", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": str(datetime.date.today()), "tokens": len(ids), "context": args.context,
                       "model": "demo", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
