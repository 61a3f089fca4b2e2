"""Where experts live: plan the GPU memory, then either keep every expert resident or build the
offloading machinery (host store, device slot cache, per-layer providers with prefetch).

Part of the composition root: it is the one place that knows both the model and the offload package.
"""

from __future__ import annotations

import functools
import os
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .config import ModelConfig
from .cpu_expert import can_split, make_cpu_expert, run_experts, run_heads, start_experts
from .errors import MoeOffloadError
from .flat import FlatLayout
from .grouped import SlotKernel, sum_rows
from .kernels import cpu as cpu_kernels
from .kernels import host_signal
from .model import MoeTransformer, Router, combine_experts
from .offload.cache import ExpertCache
from .offload.experts import OffloadedExperts
from .offload.hybrid import CostModel, HybridExecutor, SplitShape, calibrate
from .offload.planner import (AUTO_CACHED_SHARE, AUTO_CACHED_SHARE_WITH_COPIES, Plan, auto_cpu_layers, fixed_bytes,
                              parse_size, plan)
from .offload.policy import PER_LAYER_POLICIES, NoCache, make_policy
from .offload.served import ServedCpuLayers, choose_cpu_share
from .offload.stats import CacheStats
from .offload.store import ExpertStore
from .quant.hqq import QuantSpec
from .quant.presets import QuantPreset
from .weights import (build_expert, expert_layout, expert_shapes, head_bytes_per_unit, head_split_ranges,
                      non_expert_bytes)

# Activations of a 512-token prefill chunk, the decode graphs' buffers, logits: a prefill peaked 0.15 GiB above the
# loaded model, a session's graphs took 0.06 GiB beside its KV cache (Mixtral 4/2, H100, BENCHMARKS.md, session 13).
WORKSPACE_BYTES = 256 << 20
FREE_MEMORY_MARGIN = 1 << 30
# Device memory a CUDA run holds beyond its tensors and the CUDA context measured at planning: kernels loaded on first
# use and cuBLAS/Triton workspaces (0.21 GiB), blocks the caching allocator keeps beyond its allocations (0.1-0.3
# GiB). Measured on the H100 (Mixtral 4/2 and 4/3, session 13) once loading stopped leaving 0.7 GiB of half-used
# blocks behind (synthetic.py, engine._build); before that it was 1 GiB and more. With 512 MiB, bench at 12 GiB
# peaked 13 MiB over its budget at nvidia-smi (12301 MiB): 64 MiB more.
RUNTIME_SLACK = 576 << 20


def cuda_runtime_bytes(device: torch.device) -> int:
    """What an explicit --gpu-memory budget must leave for the CUDA runtime, so the whole process stays within
    it as nvidia-smi counts it: the context as measured now (device memory in use that PyTorch's allocator did
    not reserve; other processes on the GPU count too, up to 2 GiB) plus ``RUNTIME_SLACK``.

    Measured at every load: a later load in the same process (bench's runs) finds a larger context and plans fewer
    slots (Mixtral 4/2 at 12 GiB: 134 after a first run's 139). Reusing the first measurement instead overran the
    budget by 0.3 GiB at nvidia-smi on a third run (BENCHMARKS.md, session 7)."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    context = total - free - torch.cuda.memory_reserved(device)
    return min(max(context, 0), 2 << 30) + RUNTIME_SLACK


@dataclass(frozen=True)
class OffloadOptions:
    """How to place experts. With none of gpu_memory/offload_per_layer set, a CUDA run offloads only if
    the model does not fit in free GPU memory; a CPU run keeps everything resident."""

    gpu_memory: int | str | None = None  # bytes or "12GiB"
    offload_per_layer: int | None = None
    policy: str = "lru"
    # Layers ahead whose experts are guessed and copied early (0: off). Off by default: on the H100 every
    # measured case ran faster without it once decode was copy-bound (BENCHMARKS.md, session 4).
    prefetch: int = 0
    pin: bool = True
    timing: bool = False  # measure copy waits with CUDA events (benchmarks)
    cache: bool = True  # False: keep no expert on the device between uses (ablation)
    force: bool = False  # offload even when everything would fit (ablations, tests)
    hybrid: str = "auto"  # off | auto | on: compute some decode misses on the CPU (offload/hybrid.py)
    cpu_threads: int | None = None  # threads of the CPU expert kernel (default: all cores but one)
    # Layers (spread over the depth) whose experts the CPU computes at decode, with no slots; "auto": as many as
    # the budget calls for where the CPU path is fast (planner.auto_cpu_layers, cpu_layers_pay), else none.
    cpu_layers: int | str = 0
    hybrid_cost: CostModel | None = None  # fixed cost model instead of a start-up measurement (tests)
    # With CPU layers, the layers between them look their experts up on the device and read misses in place
    # (offload/experts.py): off | auto (CUDA, pinned store, grouped kernels, and the cached layers keep most of their
    # experts: LOOKUP_MIN_CACHED_SHARE) | on (also on a CPU device: tests).
    device_lookup: str = "auto"
    # Split a layer's misses between CPU and GPU within each expert (the CPU computes the first hidden units from host
    # memory, the rest is copied), where the cost model says it finishes earlier than whole experts (offload/hybrid.py).
    # Off by default: on the H100 it measured slower than whole experts with the GPU waiting for the CPU (12 GiB: 21.6
    # against 25.6 tok/s; 9.6 GB: 18.4 against 20.5, Mixtral 4/2; BENCHMARKS.md, session 8).
    split: bool = False
    # CUDA: the GPU stream waits for CPU results (cuStreamWaitValue32 on a pinned flag) instead of the host thread.
    gpu_waits: bool = True
    # CPU layers copy some of their experts into a scratch slot for the GPU, where the copy link finishes them earlier
    # than the CPU would (HybridExecutor.cpu_layer_share). None: on a CUDA device (elsewhere a "copy" and the CPU's
    # work share the same cores); False: the CPU computes all of a CPU layer's experts.
    cpu_layer_copies: bool | None = None
    # With those copies, a CPU layer copies its guess of the next CPU layer's first expert ahead. Off by default: on the
    # H100 it gained 3% at 12 GiB with 15 CPU layers and lost 10% at 9.6 GB with 20 (many CPU layers next to each other:
    # a wrong guess holds the link when the next layer's own copy is due; BENCHMARKS.md, session 10).
    stage_cpu_guess: bool = False
    # CPU layers compute on the calling thread; False: on the C library's thread like other CPU work (with gpu_waits
    # the host then enqueues the rest of the step while the CPU works).
    cpu_layers_inline: bool = True
    # CPU layers served without the host (offload/served.py): at decode a C thread handles every CPU layer as the GPU
    # stream signals it, so a decode step has no host sync. off | auto (CUDA, where it can run; also layers whose
    # experts the server only copies, cpu_k 0) | on (auto, and a CPU device: tests). cpu_k 0 was opt-in in session 15
    # (Mixtral 4/3 streamed stalled in a graph capture's warm-up); since the served layers' first passes wait on the
    # host, it ran clean on the H100 (BENCHMARKS.md, session 16). ``serve_guess``: the server copies its guess of the
    # next CPU layer's first expert ahead.
    serve_cpu_layers: str = "auto"
    serve_guess: bool = True

    @property
    def requested(self) -> bool:
        return (self.gpu_memory is not None or self.offload_per_layer is not None
                or (isinstance(self.cpu_layers, int) and self.cpu_layers > 0))


def parse_cpu_layers(value: int | str) -> int | str:
    """--cpu-layers: a number of layers (as int or text), or "auto"."""
    if isinstance(value, int) or value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise MoeOffloadError(f"--cpu-layers {value!r} must be a number of layers or auto") from None


def kv_cache_bytes(config: ModelConfig, max_context: int, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * config.num_kv_heads * max_context * config.head_dim * dtype.itemsize


def plan_placement(config: ModelConfig, preset: QuantPreset | None, device: torch.device, dtype: torch.dtype,
                   max_context: int, options: OffloadOptions) -> Plan | None:
    """A Plan when experts must be offloaded; None when every expert stays resident."""
    if not options.requested and not options.force and device.type != "cuda":
        return None
    if options.prefetch < 0:
        raise MoeOffloadError(f"--prefetch {options.prefetch} must be >= 0 (layers ahead; 0 disables)")
    runtime = 0
    if options.gpu_memory is None:
        budget = None
        if device.type == "cuda":  # free memory already excludes the context; the margin covers the rest
            free, _ = torch.cuda.mem_get_info(device)
            budget = max(free - FREE_MEMORY_MARGIN, 0)
    else:
        budget = parse_size(options.gpu_memory) if isinstance(options.gpu_memory, str) else int(options.gpu_memory)
        runtime = cuda_runtime_bytes(device)  # the budget is the whole process's, as nvidia-smi shows it
    # Offloading sees only the MoE layers, numbered 0, 1, ... (config.moe_layers): dense layers have no experts.
    # The workspace and the scratch slots are counted where the budget is a GPU's.
    expert_bytes = expert_layout(config, preset, dtype).nbytes
    gpu = device.type == "cuda"
    sizes = dict(expert_bytes=expert_bytes, num_layers=len(config.moe_layers),
                 num_experts=config.num_experts, non_expert_bytes=non_expert_bytes(config, preset, dtype),
                 kv_cache_bytes=kv_cache_bytes(config, max_context, dtype),
                 workspace_bytes=WORKSPACE_BYTES if gpu else 0, runtime_bytes=runtime)
    cpu_layers = parse_cpu_layers(options.cpu_layers)
    everything = sizes["num_layers"] * sizes["num_experts"] * sizes["expert_bytes"]
    if ((budget is None or fixed_bytes(**sizes) + everything <= budget) and cpu_layers in (0, "auto")
            and options.offload_per_layer is None and not options.force):
        plan(budget, top_k=config.top_k, policy=options.policy, **sizes)  # checks the options all the same
        return None  # everything fits, the embedding table included
    # Offloading on a GPU: the embedding table goes to host memory, and its room to experts. (A plan that then keeps
    # every expert still offloads: the table must stay in host memory.)
    host = host_weights_bytes(config, dtype) if gpu else 0
    sizes["non_expert_bytes"] -= host
    sizes["scratch_bytes"] = scratch_slots(config) * expert_bytes if gpu else 0
    if cpu_layers == "auto":
        cpu_path = (device.type == "cuda" and options.hybrid != "off" and options.offload_per_layer is None
                    and options.policy in PER_LAYER_POLICIES)
        pays = cpu_path and cpu_layers_pay(config, preset)
        copies = options.cpu_layer_copies is not False  # on a CUDA device, where auto places CPU layers at all
        share = AUTO_CACHED_SHARE_WITH_COPIES if copies else AUTO_CACHED_SHARE
        cpu_layers = auto_cpu_layers(budget, cached_share=share, **sizes) if pays else 0
        streams = (cpu_path and options.serve_cpu_layers != "off"
                   and hybrid_unsupported(config, preset.experts if preset else None) is None)
        if not pays and streams and not _fits(budget, config, options, sizes, host):
            # Nothing fits with a cache: every layer streams its experts through the scratch slots at decode, copied
            # by the served layers' thread (placement.make_served: the CPU computes none where it is slow).
            cpu_layers = sizes["num_layers"]
    p = plan(budget, top_k=config.top_k, offload_per_layer=options.offload_per_layer, policy=options.policy,
             cpu_layers=cpu_layers, host_weights_bytes=host, **sizes)
    if p.all_resident and not host and options.offload_per_layer is None and not options.force:
        return None
    return p


def _fits(budget: int | None, config: ModelConfig, options: OffloadOptions, sizes: dict, host: int) -> bool:
    try:
        plan(budget, top_k=config.top_k, policy=options.policy, host_weights_bytes=host, **sizes)
    except MoeOffloadError:
        return False
    return True


def host_weights_bytes(config: ModelConfig, dtype: torch.dtype) -> int:
    """Non-expert weights an offloading plan on a GPU keeps in host memory: the embedding table (unless lm_head shares
    it). A decode step reads one row of it (8 KB for Mixtral); its 250 MiB are four Mixtral 4/2 expert slots."""
    return 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size * dtype.itemsize


HOST_WEIGHTS = ("embed_tokens.weight",)  # what host_weights_bytes counts


class _Pending:
    """Stands in for a layer's experts until the offloading machinery is installed."""

    def __call__(self, *args):
        raise RuntimeError("experts not installed")


LOOKUP_MODES = ("off", "auto", "on")
# auto turns device lookup on only where the cached layers keep at least this share of their experts: every miss it
# reads in place (~35 GB/s) sits in the step, while host lookup copies it (~53 GB/s) beside other work. Measured on
# the H100, Mixtral 4/2 with int8 activations, decode against host lookup (BENCHMARKS.md, session 7): 12 GiB with 12
# CPU layers (0.87 of the experts kept) 21.2 against 19.0 tok/s; with 9 (0.75) 22.7 against 26.0; 9.6 GB with 16
# (0.71) 17.4 against 18.9.
LOOKUP_MIN_CACHED_SHARE = 0.85


def scratch_slots(config: ModelConfig) -> int:
    """Scratch slots for experts that get no cache slot: top_k of them, so one token's experts always fit at once
    and decode keeps computing them in one grouped launch, the arithmetic of the resident model."""
    return max(2, config.top_k)


def prefill_scratch_slots(config: ModelConfig, p: Plan) -> int:
    """More scratch slots for prefill alone: the budget's spare slots (Plan.spare_slots), up to a whole layer with the
    others. A prefill streams CPU layers' experts through the scratch ring, and with two slots only two copies ran
    ahead of the computation (BENCHMARKS.md, sessions 10 and 12). ``MOE_OFFLOAD_PREFILL_RING=N`` (profiling): N of
    them, whatever the budget."""
    forced = os.environ.get("MOE_OFFLOAD_PREFILL_RING")
    if forced is not None:
        return int(forced)
    return max(0, min(p.spare_slots, config.num_experts - scratch_slots(config)))


def wants_device_lookup(options: OffloadOptions, p: Plan, device: torch.device) -> bool:
    """Whether device lookup may run (install_offload still needs a pinned store and the grouped kernels on CUDA)."""
    if options.device_lookup not in LOOKUP_MODES:
        raise MoeOffloadError(f"--device-lookup {options.device_lookup!r} is not one of {', '.join(LOOKUP_MODES)}")
    if options.device_lookup == "off" or not options.cache:
        return False
    if not p.cpu_layers:
        if options.device_lookup == "on":
            raise MoeOffloadError("--device-lookup on needs --cpu-layers: the CPU layers are where the host catches up "
                                  "with the lookups (add --cpu-layers N or auto)")
        return False
    if options.device_lookup == "on":
        return True
    cached_share = p.total_slots / ((p.num_layers - p.cpu_layers) * p.num_experts) if p.cpu_layers < p.num_layers else 0
    return device.type == "cuda" and cached_share >= LOOKUP_MIN_CACHED_SHARE


def prepare_offload(model: MoeTransformer, layout: FlatLayout, options: OffloadOptions, p: Plan | None = None,
                    device: torch.device | None = None) -> tuple[ExpertStore, torch.Tensor | None]:
    """Detach the resident expert modules and allocate the host store the loader fills. With device lookup also
    the slots, first: the store is aligned to them (a host expert is then a whole number of slots away)."""
    blocks = model.moe_blocks()
    for block in blocks:
        block.set_experts(_Pending())
    keys = [(l, e) for l in range(len(blocks)) for e in range(model.config.num_experts)]  # l: MoE layer number
    slots = None
    if p is not None and device is not None and wants_device_lookup(options, p, device):
        total = p.total_slots + scratch_slots(model.config) + prefill_scratch_slots(model.config, p)
        slots = torch.empty((total, layout.nbytes), dtype=torch.uint8, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        if slots is None:
            return ExpertStore(layout, keys, pin=options.pin), None
        # Larger chunks: each pays up to one expert of padding for the alignment.
        return ExpertStore(layout, keys, pin=options.pin, chunk_bytes=4 << 30, align_to=slots.data_ptr()), slots


def install_offload(model: MoeTransformer, store: ExpertStore, p: Plan, preset: QuantPreset | None,
                    device: torch.device, options: OffloadOptions,
                    slot_buffer: torch.Tensor | None = None) -> tuple[ExpertCache, HybridExecutor | None]:
    """Build the slot cache (and the hybrid CPU path when on); give every MoE layer an OffloadedExperts provider."""
    c = model.config
    missing = len(store.keys()) - len(store.filled)
    if missing:
        raise MoeOffloadError(f"{missing} expert(s) missing from the checkpoint; it is incomplete")
    blocks = model.moe_blocks()  # offloading numbers them 0, 1, ...: dense layers have no experts
    stats = CacheStats.for_layers(len(blocks))
    slots = p.layer_slots if p.layer_slots is not None else p.total_slots
    spec = preset.experts if preset else None
    # cache=False (an ablation): no slot keeps anything, every routed expert is copied on use.
    policy = make_policy(p.policy, len(blocks), slots) if options.cache else NoCache()
    cache = ExpertCache(store, policy, device, lambda views: build_expert(views, c, spec), stats,
                        scratch_slots=scratch_slots(c), prefill_scratch_slots=prefill_scratch_slots(c, p),
                        timing=options.timing, slots=slot_buffer)
    hybrid = make_hybrid(store, cache, c, spec, device, options, p.cpu_layers)
    cpu_layers = set(p.cpu_layer_ids)
    # Decode computes a token's experts straight from the slots (the slots are a stack: one stride apart).
    grouped = SlotKernel(cache.modules[0], store.layout.nbytes, len(blocks), device) if device.type == "cuda" else None
    lookup = slot_buffer is not None and _device_lookup_runs(options, store, grouped, model)
    if lookup:
        cache.enable_device_lookup(c.top_k)
    ordered = sorted(cpu_layers)
    guesses: dict[int, set[int]] = {}
    depth = prefetch_depth(options.prefetch, store.pinned, device)
    for i, block in enumerate(blocks):
        ahead_depth = depth
        following = next((j for j in range(i + 1, len(blocks)) if j in cpu_layers), len(blocks))
        # A CPU layer sharing its experts with the copy link stages a guess for the next CPU layer (OffloadedExperts).
        stage_ahead = ((following, blocks[following].router)
                       if i in cpu_layers and following < len(blocks) and hybrid is not None and hybrid.copy_share
                       and options.stage_cpu_guess else None)
        if i in cpu_layers and (store.pinned or lookup):
            # A CPU layer's time is the CPU's, and the copy link would idle through it: it guesses for the layers
            # up to the next CPU layer (at most CPU_LAYER_LOOKAHEAD), and their copies run while the CPU works.
            gap = following - i - 1
            ahead_depth = max(depth, gap if lookup else min(gap, CPU_LAYER_LOOKAHEAD))
        extra = LOOKUP_GUESS_EXTRA if lookup and i in cpu_layers else 0
        ahead = [(j, widened(blocks[j].router, extra)) for j in range(i + 1, min(i + 1 + ahead_depth, len(blocks)))]
        catch_up: list[int] = []
        if lookup and i in cpu_layers:  # the device-lookup layers since the previous CPU layer, wrapping around
            previous = ordered[ordered.index(i) - 1]
            span = range(previous + 1, i) if previous < i else [*range(previous + 1, len(blocks)), *range(i)]
            catch_up = [j for j in span if j not in cpu_layers]
        block.set_experts(OffloadedExperts(i, cache, combine_experts, ahead, guesses,
                                           counts_tokens=i == (ordered[0] if lookup else 0),
                                           hybrid=hybrid, grouped=grouped, cpu_only=i in cpu_layers,
                                           num_experts=c.num_experts, last_layer=i == len(blocks) - 1,
                                           device_lookup=lookup, catch_up=catch_up, stage_ahead=stage_ahead,
                                           top_k=c.top_k))
    model.before_forward = blocks[0].experts.begin  # a prefill's first copies start before its first attention
    served = make_served(blocks, cache, hybrid, p, options, c, grouped, lookup, model.dtype)
    if served is not None:
        for i in ordered:
            blocks[i].experts.served = served
    return cache, hybrid


SERVE_MODES = ("off", "auto", "on")
# Served CPU layers need the server's stream apart from the waiting one (kernels/host_signal.py); the CUDA default is 8.
MIN_CONNECTIONS = 8
# The served layers' stream operations on CUDA (offload/served.py's Signals)
STREAM_SIGNALS = types.SimpleNamespace(copy=host_signal.copy_async, write=host_signal.write_value,
                                       wait=host_signal.wait_geq)
# The calibrated CPU expert (one, on an idle host) against what a served CPU layer's expert costs in decode, with the
# GPU and the copy link busy: 0.57-0.70 ms against 1.15 (H100 box, Mixtral 4/2; BENCHMARKS.md, session 14). Taken at
# face value the calibration put both of a layer's experts on the CPU (22.9 ms of CPU work a token at 12 GiB).
SERVED_CPU_UNDER_LOAD = 2.0


def make_served(blocks: list, cache: ExpertCache, hybrid: HybridExecutor | None, p: Plan, options: OffloadOptions,
                config: ModelConfig, grouped: SlotKernel | None, lookup: bool,
                dtype: torch.dtype) -> ServedCpuLayers | None:
    """Serve the CPU layers without the host (offload/served.py) where ``options.serve_cpu_layers`` asks and it can run;
    the layers between them then get all their experts now (they hold a slot for each), so that no layer needs the
    host at decode."""
    mode = options.serve_cpu_layers
    if mode not in SERVE_MODES:
        raise MoeOffloadError(f"--serve-cpu-layers {mode!r} is not one of {', '.join(SERVE_MODES)}")
    cpu_layers = sorted(p.cpu_layer_ids)
    if mode == "off" or (mode == "auto" and cache.device.type != "cuda"):
        return None
    reason = served_unsupported(cache, hybrid, p, config, grouped, dtype)
    if reason is not None:
        if mode == "on":
            raise MoeOffloadError(f"--serve-cpu-layers on cannot run: {reason} (use auto or off)")
        return None
    K, fused = config.top_k, fused_cpu_layers(hybrid, p)
    if fused:
        max_gpu = cache.scratch_slots // 2 if hybrid.copy_share else 0  # two sets of slots: one per CPU layer parity
        cpu_k = choose_cpu_share(K, lambda n: SERVED_CPU_UNDER_LOAD * hybrid.cost.cpu_call_ms(n), hybrid.cost.copy_ms,
                                 max_gpu)
    else:  # no fused CPU kernel for these experts: the server copies all of them (one set of slots, no guesses)
        cpu_k = 0
    ahead = {layer: blocks[nxt].router for layer, nxt in zip(cpu_layers, cpu_layers[1:])}
    others = [i for i in range(len(blocks)) if i not in p.cpu_layer_ids]
    served = ServedCpuLayers(cpu_layers, cache, (lambda key: hybrid.cpu_expert(key).fused_parts()) if cpu_k else None,
                             K, cpu_k, cache.scratch_slot_numbers, hybrid.threads, ahead, sum_rows,
                             cpu_kernels.LayerServer, config.hidden_size,
                             rows=grouped.rows if grouped is not None else None, guess=options.serve_guess,
                             counts_tokens=any(blocks[i].experts.counts_tokens for i in cpu_layers),
                             signals=STREAM_SIGNALS,
                             driver_for=host_signal.driver_for, own_stream=host_signal.own_stream,
                             release_stream=host_signal.release_stream)
    for i in others:  # every expert of the other layers into its slot now: no miss will ever call the host
        cache.load(i, list(range(config.num_experts)))
    cache.scratch_shared = True
    cache.collectors.append(functools.partial(served.fold, cache.stats, others if lookup else ()))
    hybrid.served = served
    return served


def fused_cpu_layers(hybrid: HybridExecutor, p: Plan) -> bool:
    """Whether the CPU layers' experts take the fused integer CPU kernel (the served CPU can compute a share)."""
    return hybrid.cpu_expert((p.cpu_layer_ids[0], 0)).fused_parts() is not None


def served_unsupported(cache: ExpertCache, hybrid: HybridExecutor | None, p: Plan, config: ModelConfig,
                       grouped: SlotKernel | None, dtype: torch.dtype) -> str | None:
    """Why the CPU layers cannot be served without the host here, or None."""
    if not p.cpu_layer_ids or hybrid is None:
        return "there are no CPU layers (--cpu-layers N or auto)"
    if config.top_k > 64:
        return f"top_k {config.top_k} is above 64"
    if not fused_cpu_layers(hybrid, p):  # the server can still copy every expert, with the slots for a layer's top_k
        if not hybrid.copy_share:
            return ("the CPU is to compute every expert (no copies), but these experts do not take the fused integer "
                    "kernel (the 4/2 preset on an AVX2 or AVX-512 CPU)")
        if cache.scratch_slots < config.top_k:
            return f"copying a layer's {config.top_k} experts needs as many scratch slots, the cache has {cache.scratch_slots}"
    slots = p.layer_slots
    others = [i for i in range(p.num_layers) if i not in p.cpu_layer_ids]
    whole = (all(slots[i] >= config.num_experts for i in others) if slots is not None
             else p.total_slots >= len(others) * config.num_experts)
    if not whole:
        return "the layers besides the CPU layers do not hold all their experts (more CPU layers, or more memory)"
    if cache.cuda:
        probe = torch.empty((1, config.hidden_size), dtype=dtype, device=cache.device)
        if not cache.store.pinned:
            return "the host store is not pinned"
        if grouped is None or not grouped.ok(probe):
            return "the grouped expert kernels do not run these experts"
        if not host_signal.available():
            return "the CUDA driver has no stream memory operations"
        queues = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "8")
        if not queues.isdigit() or int(queues) < MIN_CONNECTIONS:
            return (f"CUDA_DEVICE_MAX_CONNECTIONS={queues} leaves streams too few hardware queues: the server's copies "
                    f"could wait behind the stream that waits for them (set it to {MIN_CONNECTIONS} or more)")
    return None


def widened(router: Router, extra: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The router, or for a wider prefetch guess its top-(k + extra) experts (softmax keeps the logits' order)."""
    if not extra:
        return router
    k = min(router.top_k + extra, router.gate.out_features)
    return lambda x: torch.topk(router.gate(x), k, dim=-1)


def _device_lookup_runs(options: OffloadOptions, store: ExpertStore, grouped: SlotKernel | None,
                        model: MoeTransformer) -> bool:
    """On CUDA, device lookup needs the store pinned (the kernels read it in place) and the grouped kernels."""
    if grouped is None:  # a CPU device (only with "on"): in-place reads are plain memory reads
        return True
    probe = torch.empty((1, model.config.hidden_size), dtype=model.dtype, device=model.device)
    reason = ("the host store is not pinned" if not store.pinned else
              None if grouped.ok(probe) else "the grouped expert kernels do not run these experts")
    if reason is not None and options.device_lookup == "on":
        raise MoeOffloadError(f"--device-lookup on cannot run: {reason} (use --device-lookup off)")
    return reason is None


def prefetch_depth(requested: int, pinned: bool, device: torch.device) -> int:
    """Layers to prefetch ahead. None from pageable host memory to a GPU: such a copy holds the host thread
    until the driver has staged it, so a speculative copy overlaps nothing and a wrong guess only costs time
    (Mixtral 4/2 at 12 GiB, pageable: 2.5 tok/s with prefetch, BENCHMARKS.md)."""
    if requested and not pinned and device.type == "cuda":
        warnings.warn("experts are in pageable host memory: speculative prefetch is off (a copy from pageable "
                      "memory blocks the host until staged; pin the store, i.e. drop --no-pin, to prefetch)",
                      RuntimeWarning, stacklevel=3)
        return 0
    return requested


# --cpu-layers warns where a calibrated CPU expert costs more than this many copies (4/3's float kernel: ~3).
CPU_LAYERS_WARN_CPU_TO_COPY = 1.5
CPU_LAYER_LOOKAHEAD = 3  # layers a CPU layer prefetches for (their guesses' copies overlap its CPU time)
# With device lookup a guessed miss that is not copied in time is read in place, inside the step: a CPU layer then
# guesses for every layer up to the next CPU layer, and this many experts beyond the router's top-k for each.
LOOKUP_GUESS_EXTRA = 1
HYBRID_MODES = ("off", "auto", "on")
# auto keeps the CPU path only where a CPU expert costs at most this many copies, as calibrated on an idle host
# (under load a CPU expert took 1.4x longer: 2.25 vs 1.63 ms). Measured on the H100 box (4/2, 12 GiB), decode
# with the CPU path against copies alone: 0.85x at 1.3 copies (pinned), 4.8x at 0.4 (pageable, no prefetch).
AUTO_MAX_CPU_TO_COPY = 0.6
# Where the GPU waits for the CPU's results (host_signal), the host no longer idles through a CPU expert and auto keeps
# the CPU path up to this ratio. Measured on the H100 box (4/2, int8 activations; a CPU expert measured 0.73 to 1.14
# copies there, at start-up or refit during decode), --hybrid on against copies only: 25.6-26.0 against 21.3 and 25.9 against 22.4 tok/s at 12 GiB,
# 20.5 against 16.0 at 9.6 GB (BENCHMARKS.md, session 8). 4/3's float CPU kernel calibrates at ~3 copies: off.
AUTO_MAX_CPU_TO_COPY_GPU_WAITS = 1.2


def default_cpu_threads() -> int:
    """All cores but one: the thread launching GPU work keeps a core (HYBRID.md: 15 of 16)."""
    return max(1, (os.cpu_count() or 2) - 1)


def cpu_layers_pay(config: ModelConfig, preset: QuantPreset | None) -> bool:
    """Whether CPU layers are worth having here: the experts take the CPU kernel's integer path (2-bit group 16,
    the 4/2 preset, on an AVX2 or AVX-512 CPU), where a CPU expert costs about a copy. Elsewhere it is 2-4x slower."""
    spec = preset.experts if preset else None
    if spec is None or (spec.bits, spec.group_size) != (2, 16) or hybrid_unsupported(config, spec) is not None:
        return False
    return all(k % 128 == 0 for _, k in expert_shapes(config).values()) and cpu_kernels.int8_available()


def hybrid_unsupported(config: ModelConfig, spec: QuantSpec | None) -> str | None:
    """Why the CPU expert path cannot run this model here, or None."""
    if spec is not None:
        dims = sorted({n for shape in expert_shapes(config).values() for n in shape})
        if any(n % 16 for n in dims) or spec.group_size % 16:
            return f"expert dims {dims} and expert group size {spec.group_size} must be multiples of 16"
        reason = cpu_kernels.unavailable_reason()
        if reason:
            return reason
    return None


def make_hybrid(store: ExpertStore, cache: ExpertCache, config: ModelConfig, spec: QuantSpec | None,
                device: torch.device, options: OffloadOptions, cpu_layers: int = 0) -> HybridExecutor | None:
    """The hybrid executor when ``options.hybrid`` asks for it (auto: on a CUDA device) and it can run."""
    if options.hybrid not in HYBRID_MODES:
        raise MoeOffloadError(f"--hybrid {options.hybrid!r} is not one of {', '.join(HYBRID_MODES)}")
    if options.cpu_threads is not None and options.cpu_threads < 1:
        raise MoeOffloadError(f"--cpu-threads {options.cpu_threads} must be >= 1")
    if cpu_layers and options.hybrid == "off":
        raise MoeOffloadError(f"--cpu-layers {cpu_layers} computes experts on the CPU; it cannot go with "
                              "--hybrid off (use auto or on)")
    if not cpu_layers and (options.hybrid == "off" or (options.hybrid == "auto" and device.type != "cuda")):
        return None
    reason = hybrid_unsupported(config, spec)
    if reason is not None:
        if options.hybrid == "on" or cpu_layers:
            flag = f"--cpu-layers {cpu_layers}" if cpu_layers else "--hybrid on"
            raise MoeOffloadError(f"{flag}: the CPU expert path cannot run: {reason}")
        warnings.warn(f"hybrid CPU path off: {reason}", RuntimeWarning, stacklevel=2)
        return None
    threads = options.cpu_threads or default_cpu_threads()
    make = make_cpu_expert(config, spec)
    cost = options.hybrid_cost
    # Misses of the cached layers go to the CPU only with --hybrid on, or auto where the CPU is fast enough;
    # CPU layers (--cpu-layers) use the CPU path either way.
    dynamic = options.hybrid == "on" or (options.hybrid == "auto" and device.type == "cuda")
    if cost is None:
        cost = calibrate(store, cache, make, threads, config.hidden_size, run_many=run_experts)
        if cpu_layers and cost.cpu_call_ms(1) > CPU_LAYERS_WARN_CPU_TO_COPY * cost.copy_ms:
            warnings.warn(f"--cpu-layers {cpu_layers}: a CPU expert takes {cost.cpu_call_ms(1):.2f} ms against "
                          f"{cost.copy_ms:.2f} ms for a copy on this machine; CPU layers will likely be slower than "
                          "copies (they pay with the 4/2 preset's experts on an AVX2/AVX-512 CPU)",
                          RuntimeWarning, stacklevel=2)
        gpu_waits = device.type == "cuda" and options.gpu_waits and host_signal.available()
        limit = AUTO_MAX_CPU_TO_COPY_GPU_WAITS if gpu_waits else AUTO_MAX_CPU_TO_COPY
        if options.hybrid == "auto" and cost.cpu_call_ms(1) > limit * cost.copy_ms:  # a lone miss on the CPU
            dynamic = False
            if not cpu_layers:
                warnings.warn(f"hybrid CPU path off: a CPU expert takes {cost.cpu_call_ms(1):.2f} ms against {cost.copy_ms:.2f} "
                              "ms for a copy on this machine (--hybrid on forces it)", RuntimeWarning, stacklevel=2)
                return None
    split = split_shape(store, config, make) if dynamic and options.split else None
    # On CUDA the GPU waits for the CPU's results (a pinned flag), so the host never does: it enqueues the rest meanwhile.
    wait_geq = host_signal.wait_geq if device.type == "cuda" and options.gpu_waits and host_signal.available() else None
    return HybridExecutor(store, cache, make, cost, threads, dynamic=dynamic, run_many=run_experts,
                          split=split, run_heads=run_heads if split else None, start=start_experts, wait_geq=wait_geq,
                          copy_share=device.type == "cuda" if options.cpu_layer_copies is None else options.cpu_layer_copies,
                          inline_cpu_layers=options.cpu_layers_inline)


# Split experts cut the hidden units in multiples of the largest of these that leaves at least SPLIT_MIN_STEPS steps
# (the CPU kernel works in blocks of 16 rows, the GPU's int8 activations in blocks of 32). Coarse steps cost little
# balance (Mixtral: 28 steps of 512, each 2.4% of an expert) and keep few row-cut variants (CPU matrix structs per
# expert and step, GPU kernel configurations per tail size).
SPLIT_QUANTA = (512, 256, 128, 64, 32, 16)
SPLIT_MIN_STEPS = 4


def split_shape(store: ExpertStore, config: ModelConfig, make) -> SplitShape | None:
    """How this model's experts split between CPU and GPU, or None where they cannot (hidden units not a multiple of
    the quantum, or a CPU layout without rows: torch's int4)."""
    units = config.intermediate_size
    quantum = next((q for q in SPLIT_QUANTA if units % q == 0 and units >= SPLIT_MIN_STEPS * q), None)
    if quantum is None or not can_split(make(store.layout.views(store.buffer(store.keys()[0])))):
        return None
    layout = store.layout
    ranges = functools.lru_cache(maxsize=None)(functools.partial(head_split_ranges, layout))  # one list per step
    return SplitShape(units, quantum, ranges, head_bytes_per_unit(layout), layout.nbytes)
