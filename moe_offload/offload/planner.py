"""How many expert slots fit on the GPU: what is left of the budget after everything that must be resident.

Non-expert weights, the KV cache and the workspace always live on the GPU; every remaining whole expert's
worth of bytes becomes one slot. Per-layer policies split slots across layers as evenly as they go (a layer
cannot borrow another's): the remainder gives some layers one slot more, spread over the depth.

CPU layers (``cpu_layers``, llama.cpp's ``--n-cpu-moe``): the experts of that many layers, spread over the
depth, are computed on the host CPU at decode and get no slot; the slots go to the other layers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

from moe_offload.errors import MoeOffloadError
from moe_offload.offload.policy import PER_LAYER_POLICIES, POLICIES

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True, slots=True)
class Plan:
    budget_bytes: int | None  # None: no cap
    policy: str
    num_layers: int
    num_experts: int
    expert_bytes: int
    slots_per_layer: int | None  # None for a global policy (layers share total_slots)
    total_slots: int
    non_expert_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    runtime_bytes: int = 0  # outside PyTorch's tensors: CUDA context, loaded kernels, library workspaces
    extra_slots: int = 0  # per-layer policies: this many layers get slots_per_layer + 1
    cpu_layers: int = 0  # layers whose experts the CPU computes at decode (no slots)
    host_weights_bytes: int = 0  # non-expert weights kept in host memory instead (not in non_expert_bytes)
    scratch_bytes: int = 0  # slots for experts that get no cache slot (copied for one use, or a CPU layer's share)

    @property
    def cpu_layer_ids(self) -> list[int]:
        """Which layers are CPU layers: ``cpu_layers`` of them, spread evenly over the depth from layer 0. The first
        is layer 0 so that every other layer has a CPU layer before it in the step, whose time covers copies of its
        guessed experts (a CPU layer guesses for the layers up to the next one)."""
        n, c = self.num_layers, self.cpu_layers
        return [i * n // c for i in range(c)]

    @property
    def layer_slots(self) -> list[int] | None:
        """Slots of each layer (per-layer policies; None for a global one): the extra ones spread evenly over
        the layers that have slots; CPU layers have none."""
        if self.slots_per_layer is None:
            return None
        cpu = set(self.cpu_layer_ids)
        gpu = [l for l in range(self.num_layers) if l not in cpu]
        n, extra = len(gpu), self.extra_slots
        out = [0] * self.num_layers
        for i, l in enumerate(gpu):
            out[l] = self.slots_per_layer + (i + 1) * extra // n - i * extra // n
        return out

    @property
    def all_resident(self) -> bool:
        return self.cpu_layers == 0 and self.total_slots >= self.num_layers * self.num_experts

    @property
    def resident_fraction(self) -> float:
        return min(1.0, self.total_slots / (self.num_layers * self.num_experts))

    @property
    def experts_total_bytes(self) -> int:
        return self.total_slots * self.expert_bytes

    @property
    def spare_slots(self) -> int:
        """Whole experts' room the budget leaves once every layer with slots holds all its experts (CPU layers; also
        where every layer is a CPU layer): more scratch slots (placement.scratch_slots), so that a prefill streams a CPU
        layer's experts further ahead."""
        every_layer_whole = self.slots_per_layer == self.num_experts or self.cpu_layers == self.num_layers
        if self.budget_bytes is None or not every_layer_whole:
            return 0
        return max(self.budget_bytes - self.used_bytes, 0) // self.expert_bytes

    @property
    def used_bytes(self) -> int:
        return (self.experts_total_bytes + self.non_expert_bytes + self.kv_cache_bytes + self.workspace_bytes
                + self.runtime_bytes + self.scratch_bytes)

    def rows(self) -> list[tuple[str, str]]:
        spl, extra = self.slots_per_layer, self.extra_slots
        per_layer = ("shared" if spl is None else f"{spl} per layer" if not extra else
                     f"{spl}-{spl + 1} per layer: {extra} layers have {spl + 1}")
        return [
            ("GPU budget", "no cap" if self.budget_bytes is None else format_bytes(self.budget_bytes)),
            ("non-expert weights", format_bytes(self.non_expert_bytes)
             + (f" (+ {format_bytes(self.host_weights_bytes)} in host memory)"
                if self.host_weights_bytes else "")),
            ("KV cache", format_bytes(self.kv_cache_bytes)),
            ("workspace", format_bytes(self.workspace_bytes)),
            *([("scratch slots", format_bytes(self.scratch_bytes))] if self.scratch_bytes else []),
            *([("CUDA runtime", format_bytes(self.runtime_bytes))] if self.runtime_bytes else []),
            ("expert slots", f"{self.total_slots} ({per_layer}) of {self.num_layers * self.num_experts} experts, "
                             f"{self.resident_fraction:.1%}"),
            *([("CPU layers", f"{self.cpu_layers} of {self.num_layers}: their experts are computed on the CPU at "
                              "decode")] if self.cpu_layers else []),
            ("expert memory", f"{self.total_slots} x {format_bytes(self.expert_bytes)} = "
                              f"{format_bytes(self.experts_total_bytes)}"),
            ("total used", format_bytes(self.used_bytes)),
            ("cache policy", "none (all resident)" if self.all_resident else self.policy),
        ]

    def __str__(self) -> str:
        rows = self.rows()
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def fixed_bytes(*, non_expert_bytes: int, kv_cache_bytes: int, workspace_bytes: int, runtime_bytes: int = 0,
                scratch_bytes: int = 0, **_) -> int:
    """What the budget holds besides the expert slots (extra keywords, the rest of a plan's sizes, are ignored)."""
    return non_expert_bytes + kv_cache_bytes + workspace_bytes + runtime_bytes + scratch_bytes


def _slots(budget_bytes: int | None, fixed: int, expert_bytes: int, everything: int) -> int:
    """Whole experts that fit in what the budget leaves after the fixed part (all of them without a budget)."""
    return everything if budget_bytes is None else min(max(budget_bytes - fixed, 0) // expert_bytes, everything)


def plan(budget_bytes: int | None, *, expert_bytes: int, num_layers: int, num_experts: int, top_k: int,
         non_expert_bytes: int, kv_cache_bytes: int, workspace_bytes: int, offload_per_layer: int | None = None,
         policy: str = "lru", runtime_bytes: int = 0, cpu_layers: int = 0, host_weights_bytes: int = 0,
         scratch_bytes: int = 0) -> Plan:
    if policy not in POLICIES:
        raise MoeOffloadError(f"unknown cache policy {policy!r}; choose one of {', '.join(POLICIES)}")
    assert expert_bytes > 0 and num_layers > 0 and 0 < top_k <= num_experts
    per_layer = policy in PER_LAYER_POLICIES
    fixed = fixed_bytes(non_expert_bytes=non_expert_bytes, kv_cache_bytes=kv_cache_bytes,
                        workspace_bytes=workspace_bytes, runtime_bytes=runtime_bytes, scratch_bytes=scratch_bytes)
    if not 0 <= cpu_layers <= num_layers:
        raise MoeOffloadError(f"--cpu-layers {cpu_layers} must be 0..{num_layers} (the model has {num_layers} MoE layers)")
    if cpu_layers and not per_layer:
        raise MoeOffloadError(f"--cpu-layers needs a per-layer cache policy ({', '.join(PER_LAYER_POLICIES)}), "
                              f"not {policy}")
    if cpu_layers and offload_per_layer is not None:
        raise MoeOffloadError("give either --cpu-layers or --offload-per-layer, not both")

    if offload_per_layer is not None:
        # The original project's knob: K experts of each layer stay in host memory.
        if not 0 <= offload_per_layer < num_experts:
            raise MoeOffloadError(
                f"offload_per_layer={offload_per_layer} must be 0..{num_experts - 1} (the model has {num_experts} "
                f"experts per layer and each layer needs at least one GPU slot)")
        spl = num_experts - offload_per_layer
        total = spl * num_layers
        needed = fixed + total * expert_bytes
        if budget_bytes is not None and needed > budget_bytes:
            raise MoeOffloadError(
                f"offload_per_layer={offload_per_layer} keeps {total} experts on the GPU and needs "
                f"{format_bytes(needed)}, more than the {format_bytes(budget_bytes)} budget; offload more experts "
                f"per layer, raise --gpu-memory or lower --max-context")
        return Plan(budget_bytes, policy, num_layers, num_experts, expert_bytes, spl if per_layer else None, total,
                    non_expert_bytes, kv_cache_bytes, workspace_bytes, runtime_bytes,
                    host_weights_bytes=host_weights_bytes, scratch_bytes=scratch_bytes)

    gpu_layers = num_layers - cpu_layers
    slots = _slots(budget_bytes, fixed, expert_bytes, gpu_layers * num_experts)
    # A per-layer policy needs a slot in every (GPU) layer; a global one, room for one layer's top-k at once.
    minimum = gpu_layers if per_layer else top_k
    if slots < minimum or (budget_bytes is not None and budget_bytes < fixed):
        assert budget_bytes is not None
        what = f"one slot per layer needs {num_layers}" if per_layer else f"policy {policy} needs top_k={top_k}"
        raise MoeOffloadError(
            f"GPU budget {format_bytes(budget_bytes)} is too small: non-expert weights "
            f"{format_bytes(non_expert_bytes)} + KV cache {format_bytes(kv_cache_bytes)} + workspace "
            f"{format_bytes(workspace_bytes)}"
            + (f" + CUDA runtime {format_bytes(runtime_bytes)}" if runtime_bytes else "")
            + (f" + scratch slots {format_bytes(scratch_bytes)}" if scratch_bytes else "")
            + f" leave {format_bytes(max(budget_bytes - fixed, 0))} for experts, but "
            f"{what} x {format_bytes(expert_bytes)} (at least {format_bytes(fixed + minimum * expert_bytes)} in "
            f"all); raise --gpu-memory, lower --max-context or use a smaller preset"
            + (f", or --policy global-lru (needs {top_k} slots in all)" if per_layer and slots >= top_k else "")
            + (", or compute more layers' experts on the CPU (--cpu-layers)" if per_layer else ""))
    spl = (slots // gpu_layers if gpu_layers else 0) if per_layer else None  # slots <= everything: spl <= num_experts
    extra = slots - spl * gpu_layers if spl is not None else 0  # < gpu_layers; 0 when spl == num_experts
    return Plan(budget_bytes, policy, num_layers, num_experts, expert_bytes, spl, slots, non_expert_bytes,
                kv_cache_bytes, workspace_bytes, runtime_bytes, extra, cpu_layers, host_weights_bytes, scratch_bytes)


# --cpu-layers auto: the layers keeping a cache should get about this share of their experts' slots. Measured on the
# H100 (Mixtral 4/2, BENCHMARKS.md, session 6), CPU layers computing all their experts: 8 CPU layers at 12 GiB (139
# slots: 5.8 per cached layer) gained 10%, 16 at 9.6 GB (90 slots: 5.6) 13%; 20 at 9.6 GB (7.5 per cached layer) lost
# 14%.
AUTO_CACHED_SHARE = 0.75
# Where CPU layers share their experts with the copy link (a CUDA device: HybridExecutor.cpu_layer_share), a CPU layer
# costs about one expert's time instead of two, and every other layer is best kept whole. Measured on the H100
# (Mixtral 4/2, int8 activations, 12 GiB, one process; BENCHMARKS.md, session 10): 15 CPU layers (the rest whole)
# 32.3 tok/s against 24.6 with 9 (the 3/4 share); in another call 15 gave 32.9 against 25.3 with 12.
AUTO_CACHED_SHARE_WITH_COPIES = 1.0


def auto_cpu_layers(budget_bytes: int | None, *, expert_bytes: int, num_layers: int, num_experts: int,
                    non_expert_bytes: int, kv_cache_bytes: int, workspace_bytes: int, runtime_bytes: int = 0,
                    cached_share: float = AUTO_CACHED_SHARE, scratch_bytes: int = 0) -> int:
    """How many layers to compute on the CPU (``--cpu-layers auto``): as few as leave the other layers about
    ``cached_share`` of their experts cached, and at least as many as the budget's slots cannot give one each."""
    if budget_bytes is None:
        return 0
    fixed = fixed_bytes(non_expert_bytes=non_expert_bytes, kv_cache_bytes=kv_cache_bytes,
                        workspace_bytes=workspace_bytes, runtime_bytes=runtime_bytes, scratch_bytes=scratch_bytes)
    slots = _slots(budget_bytes, fixed, expert_bytes, num_layers * num_experts)
    wanted = math.ceil(num_layers - slots / (cached_share * num_experts))
    return min(num_layers, max(0, wanted, num_layers - slots))


def parse_size(text: str) -> int:
    """ "12GiB", "12.5 gib", "800MB", "64KiB", "4096B" -> bytes. GB/MB/KB are decimal, GiB/MiB/KiB binary."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]i?b|b)\s*", str(text), re.IGNORECASE)
    if not m:
        raise MoeOffloadError(f"cannot read size {text!r}; write a number and a unit, e.g. 12GiB, 12.5GiB or 800MiB")
    return int(Decimal(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"
