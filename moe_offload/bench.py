"""Speed measurement: ``measure()`` runs prefill and batch-1 greedy decode and returns a BenchResult.

No printing here (the CLI draws the table). Speed is only ever measured here and in benchmarks/,
never in timed unit tests.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from .engine import Engine

if TYPE_CHECKING:
    from .routing import TraceReplay

SYNTHETIC_ROUTING = "synthetic: random router weights, routing close to uniform over experts"


@dataclass
class BenchResult:
    label: str
    model: str
    device: str
    preset: str
    gpu_memory: str
    policy: str
    prefetch: int
    prompt_tokens: int
    new_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    decode_ms_per_token: float
    hit_rate: float
    prefetch_recall: float
    prefetch_precision: float
    bytes_copied_per_token: float
    copy_wait_ms_per_token: float
    host_syncs_per_token: float
    h2d_gb_s: float
    limit_tok_s: float
    resident_ms_per_token: float
    resident_ms_source: str  # "measured (everything resident)" or "decode time minus copy waits"
    total_slots: int
    slots_per_layer: int | None
    expert_bytes: int
    pinned: bool
    peak_gpu_bytes: int
    peak_host_bytes: int  # the process's peak resident set so far (ablations run in one process)
    routing: str
    hybrid: bool = False  # some decode misses computed on the CPU
    cpu_threads: int = 0
    cpu_experts_per_token: float = 0.0
    cpu_ms_per_token: float = 0.0  # CPU time of those experts (runs beside the GPU)
    cpu_wait_ms_per_token: float = 0.0  # host time waiting for CPU results once the GPU work was enqueued
    int8_activations: bool = False  # 2/3/4-bit experts took int8-rounded decode inputs (not exact)
    cpu_layers: int = 0  # layers whose experts the CPU computed at decode (no GPU slots)
    device_lookup: bool = False  # the layers between CPU layers looked their experts up on the GPU
    in_place_per_token: float = 0.0  # misses read in place from host memory (device lookup)
    split_experts_per_token: float = 0.0  # misses split: first hidden units on the CPU, the rest copied (hybrid)
    # The hybrid path's cost model as decode left it (ms per copy, per CPU expert, per CPU call): what split the CPU
    # layers' experts between the CPU and the copy link (runs whose split drifted: BENCHMARKS.md, session 13)
    cost_model: dict | None = None
    # CPU layers served without the host (offload/served.py): the CPU's share of a CPU layer's top-k, and the server's
    # counters over decode (copies, guesses copied ahead, guesses the router then chose); None: not served
    served: dict | None = None

    def to_json(self) -> dict:
        return asdict(self)


def measure_h2d(device: torch.device, nbytes: int = 256 << 20, pinned: bool = True, repeats: int = 8) -> float:
    """Host-to-device copy bandwidth in GB/s (best of ``repeats``), as the expert cache would see it."""
    if device.type != "cuda":
        src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    else:
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _greedy_run(engine: Engine, prompt: list[int], new_tokens: int, replay: TraceReplay | None = None,
                warmup: bool = False) -> tuple[float, float]:
    """(prefill seconds, decode seconds for new_tokens - 1 steps) of one greedy generation."""
    session = engine.new_session()
    if replay is not None:  # a new sequence: routing restarts at the trace's first token (other experts in warm-up)
        replay.rewind(warmup)
    device = engine.device
    _sync(device)
    t0 = time.perf_counter()
    logits, _ = session.prefill(prompt)
    token = int(logits.argmax())  # also waits for the GPU
    t1 = time.perf_counter()
    if engine.cache_stats is not None:
        engine.cache_stats.reset()  # decode statistics only
        if engine.expert_cache is not None:
            engine.expert_cache.collect_timing()
            engine.cache_stats.reset()
    for _ in range(new_tokens - 1):
        token = int(session.step(token).argmax())
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


PREFILL_REPEATS = 3


def _prefill_time(engine: Engine, prompt: list[int], replay: TraceReplay | None) -> float:
    session = engine.new_session()
    if replay is not None:
        replay.rewind(False)
    _sync(engine.device)
    t0 = time.perf_counter()
    logits, _ = session.prefill(prompt)
    int(logits.argmax())  # waits for the GPU
    return time.perf_counter() - t0


def measure(engine: Engine, *, label: str = "full", model: str = "", prompt_tokens: int = 512,
            new_tokens: int = 128, seed: int = 0, h2d_gb_s: float | None = None,
            resident_ms_per_token: float | None = None, gpu_memory: str = "", routing: str = "",
            replay: TraceReplay | None = None) -> BenchResult:
    """Warm up, then time a prefill of ``prompt_tokens`` random tokens and ``new_tokens`` greedy steps (prefill:
    the median of three runs).
    ``replay``: a routing trace installed on the model (routing.py), rewound for each run."""
    device = engine.device
    g = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    # Warm up at the measured length: Triton compiles per batch-size class on first use, which is not speed.
    warm = torch.randint(3, vocab, (prompt_tokens,), generator=g).tolist()
    prompt = torch.randint(3, vocab, (prompt_tokens,), generator=g).tolist()
    if prompt_tokens + new_tokens > engine.max_context:
        from .errors import MoeOffloadError

        raise MoeOffloadError(f"--prompt-tokens {prompt_tokens} + --new-tokens {new_tokens} exceed the context "
                              f"{engine.max_context}; raise --max-context")
    _greedy_run(engine, warm, 32, replay, warmup=True)  # kernels compiled, expert decode graphs captured, caches warm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    prefill_s, decode_s = _greedy_run(engine, prompt, new_tokens, replay)
    steps = max(new_tokens - 1, 1)
    decode_ms = decode_s / steps * 1e3
    stats = engine.cache_stats
    cache = engine.expert_cache
    if cache is not None:
        cache.collect_timing()
    summary = stats.summary() if stats is not None else {}
    # Prefill is one short timing, easily thrown by a late JIT compile or the host: the median of three runs of
    # the same prompt (after the decode statistics are taken, so they stay the decode's own).
    prefill_s = statistics.median([prefill_s] + [_prefill_time(engine, prompt, replay) for _ in range(PREFILL_REPEATS - 1)])
    wait_ms = summary.get("copy_wait_ms", 0.0) / steps
    bytes_per_token = summary.get("bytes_copied_per_token", 0.0)
    pinned = bool(cache.store.pinned) if cache is not None else True
    bw = h2d_gb_s if h2d_gb_s is not None else measure_h2d(device, pinned=pinned)
    if resident_ms_per_token is None:
        resident_ms, source = max(decode_ms - wait_ms, 0.0), "decode time minus copy waits"
    else:
        resident_ms, source = resident_ms_per_token, "measured (everything resident)"
    limit_s = bytes_per_token / (bw * 1e9) + resident_ms / 1e3
    plan = engine.plan
    hybrid = engine.hybrid
    return BenchResult(
        label=label, model=model, device=_device_name(device), preset=engine.preset.name if engine.preset else "none",
        gpu_memory=gpu_memory, policy=plan.policy if plan else "resident",
        prefetch=len(engine.model.moe_blocks()[0].experts.lookahead) if cache is not None else 0,
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, prefill_tok_s=prompt_tokens / prefill_s,
        decode_tok_s=1e3 / decode_ms, decode_ms_per_token=decode_ms,
        hit_rate=summary.get("hit_rate", 1.0), prefetch_recall=summary.get("prefetch_recall", 0.0),
        prefetch_precision=summary.get("prefetch_precision", 0.0), bytes_copied_per_token=bytes_per_token,
        copy_wait_ms_per_token=wait_ms, host_syncs_per_token=summary.get("host_syncs_per_token", 0.0),
        h2d_gb_s=bw, limit_tok_s=1 / limit_s if limit_s > 0 else float("inf"),
        resident_ms_per_token=resident_ms, resident_ms_source=source,
        total_slots=plan.total_slots if plan else len(engine.config.moe_layers) * engine.config.num_experts,
        slots_per_layer=plan.slots_per_layer if plan else engine.config.num_experts,
        expert_bytes=cache.store.layout.nbytes if cache is not None else 0, pinned=pinned,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
        peak_host_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        routing=routing,
        hybrid=hybrid is not None, cpu_threads=hybrid.threads if hybrid is not None else 0,
        cpu_experts_per_token=summary.get("cpu_experts_per_token", 0.0),
        cpu_ms_per_token=summary.get("cpu_ms_per_token", 0.0),
        cpu_wait_ms_per_token=summary.get("cpu_wait_ms_per_token", 0.0),
        int8_activations=engine.options.int8_activations,
        cpu_layers=plan.cpu_layers if plan else 0,
        device_lookup=cache is not None and cache.table is not None,
        in_place_per_token=summary.get("in_place_per_token", 0.0),
        split_experts_per_token=summary.get("split_experts_per_token", 0.0),
        cost_model=None if hybrid is None else {"copy_ms": hybrid.cost.copy_ms, "cpu_ms": hybrid.cost.cpu_ms,
                                                "cpu_fixed_ms": hybrid.cost.cpu_fixed_ms},
        served=_served_summary(hybrid, steps),
    )


def _served_summary(hybrid, steps: int) -> dict | None:
    served = getattr(hybrid, "served", None)
    if served is None:
        return None
    counters = served.decode_counters()
    per_token = {f"{k}_per_token": counters[k] / steps for k in ("copies", "guesses", "guess_hits")}
    return {"cpu_k": served.cpu_k, "top_k": served.top_k, "guess": bool(served.guess_routers), **per_token,
            "errors": counters["errors"]}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def release(engine: Engine) -> None:
    """Free an engine's memory before building the next one (ablations run back to back)."""
    if engine.hybrid is not None:  # its worker and its reference to the cache (the GPU slots) go too
        engine.hybrid.close()
    engine.model = engine.expert_cache = engine.cache_stats = engine._session = engine.hybrid = None  # host store too
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
