"""Quantization presets: which QuantSpec goes to attention, experts and lm_head."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MoeOffloadError
from .hqq import META_BITS, QuantSpec


@dataclass(frozen=True, slots=True)
class QuantPreset:
    """Attention projections, experts and (optionally) lm_head each get their own spec.

    Router, norms and embeddings always stay 16-bit; lm_head stays 16-bit unless ``lm_head`` is set.
    """

    name: str
    attention: QuantSpec
    experts: QuantSpec
    lm_head: QuantSpec | None = None

    def to_json(self) -> dict:
        spec = lambda s: None if s is None else {"bits": s.bits, "group_size": s.group_size, "quant_meta": s.quant_meta,
                                                 "meta_bits": s.meta_bits}
        return {"preset": self.name, "attention": spec(self.attention), "experts": spec(self.experts),
                "lm_head": spec(self.lm_head)}

    @classmethod
    def from_json(cls, data: dict) -> "QuantPreset":
        spec = lambda d: None if d is None else QuantSpec(int(d["bits"]), int(d["group_size"]), bool(d["quant_meta"]),
                                                          int(d.get("meta_bits", 8)))
        return cls(str(data["preset"]), spec(data["attention"]), spec(data["experts"]), spec(data.get("lm_head")))


PRESETS = {
    # The original Mixtral-offloading demo: experts 2-bit, group 16, 8-bit scales/zeros.
    "4/2": QuantPreset("4/2", QuantSpec(4, 64), QuantSpec(2, 16, quant_meta=True)),
    # 4/2 with 4-bit scales/zeros, both in one byte per group: 53.2 instead of 63.7 MiB per Mixtral expert
    # (2.53 bits per weight, under llama.cpp's Q2_K), at 4/2's perplexity on the demo model (BENCHMARKS.md).
    "4/2-lean": QuantPreset("4/2-lean", QuantSpec(4, 64), QuantSpec(2, 16, quant_meta=True, meta_bits=4)),
    # The recommended quality/size trade-off.
    "4/3": QuantPreset("4/3", QuantSpec(4, 64), QuantSpec(3, 64)),
    "4/4": QuantPreset("4/4", QuantSpec(4, 64), QuantSpec(4, 64)),
    # Near-lossless; useful as a quality yardstick.
    "8/8": QuantPreset("8/8", QuantSpec(8, 64), QuantSpec(8, 64)),
}


def make_preset(preset: str | None = None, *, attn_bits: int | None = None, attn_group: int | None = None,
                expert_bits: int | None = None, expert_group: int | None = None,
                expert_quant_meta: bool | None = None, expert_meta_bits: int | None = None,
                lm_head_bits: int | None = None) -> QuantPreset:
    """A named preset, with any of its settings overridden (flags win over the preset)."""
    if preset is not None and preset not in PRESETS:
        raise MoeOffloadError(f"--preset {preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    if expert_meta_bits is not None and expert_meta_bits not in META_BITS:
        raise MoeOffloadError(f"--expert-meta-bits {expert_meta_bits} is not supported; choose "
                              f"{' or '.join(map(str, META_BITS))}")
    base = PRESETS[preset or "4/3"]
    customized = any(v is not None for v in (attn_bits, attn_group, expert_bits, expert_group, expert_quant_meta,
                                             expert_meta_bits))
    attention = QuantSpec(attn_bits or base.attention.bits, attn_group or base.attention.group_size)
    expert_meta = base.experts.quant_meta if expert_quant_meta is None else expert_quant_meta
    if expert_bits is not None and expert_quant_meta is None and expert_bits != base.experts.bits:
        expert_meta = False  # the preset's meta setting belongs to its own bit width
    if expert_meta_bits is not None and expert_meta_bits != 8 and expert_quant_meta is None:
        expert_meta = True  # asking for 4-bit scales/zeros asks for quantized ones
    meta_bits = (expert_meta_bits or base.experts.meta_bits) if expert_meta else 8
    experts = QuantSpec(expert_bits or base.experts.bits, expert_group or base.experts.group_size, expert_meta, meta_bits)
    lm_head = QuantSpec(lm_head_bits, 64) if lm_head_bits else None
    name = base.name
    if customized:  # overrides that land on a named preset take its name (--preset 4/2 --expert-meta-bits 4: 4/2-lean)
        same = [p.name for p in PRESETS.values() if (p.attention, p.experts, p.lm_head) == (attention, experts, lm_head)]
        name = same[0] if same else f"custom({attention.bits}/{experts.bits})"
    return QuantPreset(name, attention, experts, lm_head)
