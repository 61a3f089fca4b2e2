"""Where experts live: plan the GPU memory, then either keep every expert resident or build the
offloading machinery (host store, device slot cache, per-layer providers with prefetch).

Part of the composition root: it is the one place that knows both the model and the offload package.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .errors import MoeOffloadError
from .flat import FlatLayout
from .model import MoeTransformer, combine_experts
from .offload.cache import ExpertCache
from .offload.experts import OffloadedExperts
from .offload.planner import Plan, parse_size, plan
from .offload.policy import NoCache, make_policy
from .offload.stats import CacheStats
from .offload.store import ExpertStore
from .quant.hqq import tensor_layout
from .quant.presets import QuantPreset
from .weights import build_expert, expert_layout

WORKSPACE_BYTES = 512 << 20  # activations of a prefill chunk, logits, allocator slack
FREE_MEMORY_MARGIN = 1 << 30


@dataclass(frozen=True)
class OffloadOptions:
    """How to place experts. With none of gpu_memory/offload_per_layer set, a CUDA run offloads only if
    the model does not fit in free GPU memory; a CPU run keeps everything resident."""

    gpu_memory: int | str | None = None  # bytes or "12GiB"
    offload_per_layer: int | None = None
    policy: str = "lru"
    prefetch: int = 1  # layers ahead whose experts are guessed and copied early (0: off)
    pin: bool = True
    timing: bool = False  # measure copy waits with CUDA events (benchmarks)
    cache: bool = True  # False: keep no expert on the device between uses (ablation)
    force: bool = False  # offload even when everything would fit (ablations, tests)

    @property
    def requested(self) -> bool:
        return self.gpu_memory is not None or self.offload_per_layer is not None


def non_expert_bytes(config: ModelConfig, preset: QuantPreset | None, dtype: torch.dtype) -> int:
    """Bytes of everything but the experts, as it will sit on the device."""
    c, size = config, dtype.itemsize

    def linear(n: int, k: int, spec) -> int:
        if spec is None:
            return n * k * size
        return sum(torch.Size(s).numel() * d.itemsize for s, d in tensor_layout((n, k), spec).values())

    attn_spec = preset.attention if preset else None
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    per_layer = (linear(q, c.hidden_size, attn_spec) + 2 * linear(kv, c.hidden_size, attn_spec)
                 + linear(c.hidden_size, q, attn_spec) + c.num_experts * c.hidden_size * size + 2 * c.hidden_size * size)
    head = 0 if c.tie_word_embeddings else linear(c.vocab_size, c.hidden_size, preset.lm_head if preset else None)
    return c.num_layers * per_layer + c.vocab_size * c.hidden_size * size + head + c.hidden_size * size


def kv_cache_bytes(config: ModelConfig, max_context: int, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * config.num_kv_heads * max_context * config.head_dim * dtype.itemsize


def plan_placement(config: ModelConfig, preset: QuantPreset | None, device: torch.device, dtype: torch.dtype,
                   max_context: int, options: OffloadOptions) -> Plan | None:
    """A Plan when experts must be offloaded; None when every expert stays resident."""
    if not options.requested and not options.force and device.type != "cuda":
        return None
    if options.prefetch < 0:
        raise MoeOffloadError(f"--prefetch {options.prefetch} must be >= 0 (layers ahead; 0 disables)")
    if options.gpu_memory is None:
        budget = None
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = max(free - FREE_MEMORY_MARGIN, 0)
    else:
        budget = parse_size(options.gpu_memory) if isinstance(options.gpu_memory, str) else int(options.gpu_memory)
    p = plan(budget, expert_bytes=expert_layout(config, preset, dtype).nbytes, num_layers=config.num_layers,
             num_experts=config.num_experts, top_k=config.top_k,
             non_expert_bytes=non_expert_bytes(config, preset, dtype),
             kv_cache_bytes=kv_cache_bytes(config, max_context, dtype),
             workspace_bytes=WORKSPACE_BYTES if device.type == "cuda" else 0,
             offload_per_layer=options.offload_per_layer, policy=options.policy)
    return None if p.all_resident and options.offload_per_layer is None and not options.force else p


class _Pending:
    """Stands in for a layer's experts until the offloading machinery is installed."""

    def __call__(self, *args):
        raise RuntimeError("experts not installed")


def prepare_offload(model: MoeTransformer, layout: FlatLayout, options: OffloadOptions) -> ExpertStore:
    """Detach the resident expert modules and allocate the host store the loader fills."""
    c = model.config
    for layer in model.layers:
        layer.moe.set_experts(_Pending())
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        return ExpertStore(layout, [(l, e) for l in range(c.num_layers) for e in range(c.num_experts)], pin=options.pin)


def install_offload(model: MoeTransformer, store: ExpertStore, p: Plan, preset: QuantPreset | None,
                    device: torch.device, options: OffloadOptions) -> ExpertCache:
    """Build the slot cache and give every MoE layer an OffloadedExperts provider."""
    c = model.config
    missing = len(store.keys()) - len(store.filled)
    if missing:
        raise MoeOffloadError(f"{missing} expert(s) missing from the checkpoint; it is incomplete")
    stats = CacheStats.for_layers(c.num_layers)
    slots = p.slots_per_layer if p.slots_per_layer is not None else p.total_slots
    spec = preset.experts if preset else None
    # cache=False (an ablation): no slot keeps anything, every routed expert is copied on use.
    policy = make_policy(p.policy, c.num_layers, slots) if options.cache else NoCache()
    cache = ExpertCache(store, policy, device, lambda views: build_expert(views, c, spec), stats,
                        scratch_slots=2 if options.cache else max(2, c.top_k), timing=options.timing)
    guesses: dict[int, set[int]] = {}
    for i, layer in enumerate(model.layers):
        ahead = [(j, model.layers[j].moe.router) for j in range(i + 1, min(i + 1 + options.prefetch, c.num_layers))]
        layer.moe.set_experts(OffloadedExperts(i, cache, combine_experts, ahead, guesses, counts_tokens=i == 0))
    return cache
