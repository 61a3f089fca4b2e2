"""Hybrid expert execution: at decode, a layer's cache misses are split between host-to-device copies
and computation on the host CPU, whichever lets the layer finish first.

Per MoE layer at decode (one token): hits run on the GPU. For the misses, a cost model (ms per expert copy; on the
CPU a fixed cost per call plus ms per expert; measured at start-up, refit from telemetry) and the copy queue's
current backlog (prefetches included) decide, miss by miss, which path would finish it earlier; ties
go to the copy, because a copied expert stays cached. CPU-computed experts never enter the cache. Prefill and
batches of more than one token stay on the GPU: a copy costs the same for any number of tokens, CPU work grows.

Where the CPU work is one fused C call (``start``), it runs on the C library's own thread: no Python thread has to be
scheduled to start or finish it. On CUDA (``wait_geq``) the host does not wait for it either: the worker writes the
outputs into pinned memory and then sets a pinned flag, and the compute stream waits for the flag and copies the
outputs up, while the host goes on enqueueing the layer's remaining work. Otherwise the CPU experts run on a Python
worker thread and their outputs, a few KB, are added last.

Split experts (``split``, opt-in): every miss of a layer is cut by hidden units instead, the CPU computing the first
units of gate and up from host memory while the rest of the expert (gate and up without those rows, all of down) is
copied into a scratch slot, so a lone miss keeps both paths busy. Measured slower than whole experts on the H100
(BENCHMARKS.md, session 8): the partial copies and the extra launches cost the host more than the balance gains.

CPU layers (``--cpu-layers``) use the same executor without a split: their experts run on the CPU at decode, on the
calling thread (``submit(inline=True)``), after the layer's guesses for the following layers have started copying.
Such a layer always misses all of its experts (top-2: two), the case where two paths beat one: with ``copy_share``
the same greedy choice as for misses (``split_misses``) sends some of them through a scratch slot to the GPU, so the
copy link works beside the CPU instead of idling through the layer (``cpu_layer_share``). Where CPU layers are served
without the host (offload/served.py: CUDA, every other layer whole) their decode skips all of this. ``run_many`` computes a
layer's CPU experts together (one parallel C call where the kernel allows); their outputs (``CpuResults.on_host``) and
the GPU's share are then summed in one grouped call where the grouped kernels run (``OffloadedExperts._mixed``).

This module knows experts only as (layer, expert) keys, host buffers and callables.
"""

from __future__ import annotations

import functools
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from .cache import ExpertCache
from .stats import LayerStats
from .store import ExpertStore

Key = tuple[int, int]
# flat views of one expert's host buffer -> callable(x float32 [T, D], threads) -> float32 [T, D]
CpuExpertFn = Callable[[torch.Tensor, int], torch.Tensor]
MakeCpuExpert = Callable[[dict[str, torch.Tensor]], CpuExpertFn]
# (one layer's CPU experts, x, threads) -> their outputs: lets the kernel compute them together
RunMany = Callable[[list, torch.Tensor, int], list[torch.Tensor]]
# (split experts' CPU halves, x, head units, threads) -> each one's first ``head`` hidden units
RunHeads = Callable[[list, torch.Tensor, int, int], list[torch.Tensor]]


class Started(Protocol):
    """CPU work already running outside Python (the C kernel's own thread). wait() -> (outputs [n, ...], ms), calling
    the on_done(ms) it was started with; ``signal``: (pinned int32 flag, value) the worker sets once the outputs (in
    pinned memory) are written, or None."""

    out: torch.Tensor
    signal: tuple[torch.Tensor, int] | None

    def wait(self) -> tuple[torch.Tensor, float]: ...


# (a layer's CPU experts, x, threads, head units or None for whole experts, signal, on_done) -> Started, or None where
# the work must run on a Python thread instead (run_many / run_heads)
Start = Callable[[list, torch.Tensor, int, "int | None", bool, Callable[[float], None]], "Started | None"]
# wait_geq(flag, value): the current CUDA stream waits until the pinned flag reaches value (kernels/host_signal.py)
WaitGeq = Callable[[torch.Tensor, int], None]


def run_one_by_one(experts: list[CpuExpertFn], x: torch.Tensor, threads: int) -> list[torch.Tensor]:
    return [fn(x, threads) for fn in experts]


@dataclass
class CostModel:
    """Milliseconds on each path: ``copy_ms`` per expert copied; on the CPU, ``cpu_fixed_ms`` per call (waking the
    thread team, rounding x, barriers) plus ``cpu_ms`` per expert's worth of bytes read. Refit from observations:
    copies by a moving average, CPU calls by a moving least-squares line through (experts, ms), which a mix of whole
    experts and split heads (fractions of an expert) pins down."""

    copy_ms: float
    cpu_ms: float
    smoothing: float = 0.1  # 0 freezes the model (tests)
    cpu_fixed_ms: float = 0.0
    # moving sums of the CPU observations (units, ms, units^2, units*ms), weighted like the averages
    _fit: tuple[float, float, float, float] | None = field(default=None, repr=False, compare=False)

    def observe_copy(self, ms: float) -> None:
        self.copy_ms += self.smoothing * (ms - self.copy_ms)

    def observe_cpu(self, ms: float, units: float = 1.0) -> None:
        """One CPU call: ``units`` experts' worth of bytes (a split head counts its share) took ``ms``."""
        if not self.smoothing:
            return
        a = self.smoothing
        point = (units, ms, units * units, units * ms)
        self._fit = point if self._fit is None else tuple((1 - a) * f + a * v for f, v in zip(self._fit, point))
        mu, my, muu, muy = self._fit
        var = muu - mu * mu
        if var > 1e-3 * max(muu, 1e-9):  # enough spread in call sizes for a line
            slope = (muy - mu * my) / var
            if slope > 0:
                self.cpu_ms = slope
                self.cpu_fixed_ms = max(0.0, my - slope * mu)
                return
        self.cpu_ms = max(1e-3, (my - self.cpu_fixed_ms) / max(mu, 1e-9))  # one call size so far: the rate only

    def cpu_call_ms(self, units: float) -> float:
        return self.cpu_fixed_ms + self.cpu_ms * units if units else 0.0


def split_misses(misses: Sequence[int], cost: CostModel, copy_backlog_ms: float = 0.0,
                 cpu_backlog_ms: float = 0.0) -> tuple[list[int], list[int]]:
    """(to copy, to compute on the CPU): each miss, in order, goes to the path on which it would finish
    first given what that path already has queued; a tie copies. For equal jobs on two servers this
    greedy choice minimizes the later finish time, i.e. when the layer's experts are all done."""
    copy_done, cpu_done = copy_backlog_ms, cpu_backlog_ms
    to_copy: list[int] = []
    to_cpu: list[int] = []
    for e in misses:
        step = cost.cpu_ms + (0.0 if to_cpu else cost.cpu_fixed_ms)  # one call for all of the layer's CPU experts
        if cpu_done + step < copy_done + cost.copy_ms:
            cpu_done += step
            to_cpu.append(e)
        else:
            copy_done += cost.copy_ms
            to_copy.append(e)
    return to_copy, to_cpu


@dataclass(frozen=True)
class SplitShape:
    """How experts of this model can be split (family knowledge, injected): ``units`` hidden units, cut in multiples
    of ``quantum``; ``ranges(head)``: the byte ranges of an expert's buffer the GPU needs when the CPU computes the first
    ``head`` units; ``head_bytes``: the bytes of the expert buffer the CPU reads per unit (gate and up rows)."""

    units: int
    quantum: int
    ranges: Callable[[int], list[tuple[int, int]]]
    head_bytes: int
    expert_bytes: int

    def cpu_share(self, head: int) -> float:
        """Share of a whole expert's bytes the CPU reads for a head of ``head`` units (its time scales with it)."""
        return head * self.head_bytes / self.expert_bytes


def plan_split(misses: int, cost: CostModel, shape: SplitShape, copy_backlog_ms: float = 0.0) -> tuple[int, float]:
    """(head, finish ms) for splitting ``misses`` experts alike: the CPU computes the first ``head`` hidden units of each
    (from host memory), the copy link brings the rest of each expert, and both finish as close together as the
    quantum allows. head 0: no split helps (a whole copy is at least as early)."""
    best = (0, copy_backlog_ms + misses * cost.copy_ms)
    if not misses:
        return best
    # The balance point: fixed + m p s h = backlog + m c (1 - s h), with s the CPU's share of an expert per unit.
    per_unit = shape.head_bytes / shape.expert_bytes
    ideal = ((copy_backlog_ms + misses * cost.copy_ms - cost.cpu_fixed_ms)
             / (misses * per_unit * (cost.cpu_ms + cost.copy_ms)))
    lower = max(0, min(shape.units, int(ideal // shape.quantum) * shape.quantum))
    for head in {lower, min(shape.units, lower + shape.quantum)}:
        if head <= 0:
            continue
        share = shape.cpu_share(head)
        finish = max(cost.cpu_call_ms(misses * share), copy_backlog_ms + misses * cost.copy_ms * (1.0 - share))
        if finish < best[1]:
            best = (head, finish)
    return best


def whole_finish(misses: Sequence[int], to_cpu: Sequence[int], cost: CostModel, copy_backlog_ms: float = 0.0) -> float:
    """When the slower path finishes, with ``to_cpu`` of ``misses`` on the CPU and the rest copied (split_misses)."""
    return max(cost.cpu_call_ms(len(to_cpu)), copy_backlog_ms + (len(misses) - len(to_cpu)) * cost.copy_ms)


def _now_ms() -> float:
    return time.perf_counter() * 1e3


class PinnedRing:
    """Pinned host buffers of each shape, handed out in turn, for the CPU path's small transfers (x down, outputs up):
    a buffer comes round again only after ``size`` more uses, and every decode layer that uses one syncs with the
    device (its routing) before the next does, so the copy from or into it has long completed. Allocated once: the
    caching host allocator costs ~0.1 ms per tensor and per layer (H100 box, session 10)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._buffers: dict[tuple, list[torch.Tensor]] = {}
        self._turn: dict[tuple, int] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        ring = self._buffers.get(key)
        if ring is None:
            ring = self._buffers[key] = [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(self.size)]
            self._turn[key] = 0
        turn = self._turn[key]
        self._turn[key] = (turn + 1) % self.size
        return ring[turn]


class CpuResults:
    """Outputs of one layer's CPU experts, arriving from the worker thread; ``expert(e)`` stands in for
    the expert's module and blocks (on the host, GPU work already enqueued) until its output exists."""

    def __init__(self, future, device: torch.device, dtype: torch.dtype, stats: LayerStats,
                 pinned: PinnedRing | None = None):
        self.future, self.device, self.dtype, self.stats = future, device, dtype, stats  # future: .result() -> dict
        self.pinned = pinned  # CUDA: outputs go up from pinned buffers, the host not waiting for the copy
        self._outputs: dict[int, torch.Tensor] | None = None

    def _get(self) -> dict[int, torch.Tensor]:
        if self._outputs is None:
            outputs = self.on_host()
            keys = list(outputs)  # one host-to-device copy for the layer's CPU experts
            parts = [outputs[e] for e in keys]
            if self.pinned is not None:  # in stream order: the host need not wait for the device to take them
                ys = torch.stack(parts, out=self.pinned.take((len(parts), *parts[0].shape), parts[0].dtype))
            else:
                ys = torch.stack(parts)
            self._outputs = dict(zip(keys, ys.to(self.device, non_blocking=True).to(self.dtype)))
        return self._outputs

    def expert(self, e: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda _x: self._get()[e]

    def on_host(self) -> dict[int, torch.Tensor]:
        """The outputs where the CPU wrote them (float32 [1, D] each), for a caller that uploads them itself."""
        start = _now_ms()
        outputs = self.future.result()
        self.stats.cpu_wait_ms += _now_ms() - start
        return outputs


class _Waited:
    """``.result()`` over Started work: the host waits for the C call, then maps experts to output rows."""

    def __init__(self, started: Started, keys: list[int]):
        self.started, self.keys = started, keys

    def result(self) -> dict[int, torch.Tensor]:
        out, _ = self.started.wait()
        return dict(zip(self.keys, out.unsqueeze(1)))


class SignaledResults:
    """Outputs of CPU work that signals a pinned flag when done: the first ``expert(e)`` makes the compute stream wait
    for the flag and copy the outputs up, and returns at once. The host never waits for the CPU here; the GPU does,
    and the host meanwhile enqueues the rest of the layer and the next one."""

    def __init__(self, started: Started, keys: list[int], wait_geq: WaitGeq, device: torch.device, dtype: torch.dtype):
        self.started, self.keys, self.wait_geq, self.device, self.dtype = started, keys, wait_geq, device, dtype
        self._outputs: dict[int, torch.Tensor] | None = None

    def _get(self) -> dict[int, torch.Tensor]:
        if self._outputs is None:
            flag, value = self.started.signal
            self.wait_geq(flag, value)
            ys = self.started.out.to(self.device, non_blocking=True).to(self.dtype)  # pinned: in stream order
            self._outputs = dict(zip(self.keys, ys.unsqueeze(1)))
        return self._outputs

    def expert(self, e: int) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda _x: self._get()[e]


class HybridExecutor:
    """The split decision, the CPU worker and the cost model, shared by every offloaded layer."""

    def __init__(self, store: ExpertStore, cache: ExpertCache, make_cpu_expert: MakeCpuExpert, cost: CostModel,
                 threads: int, dynamic: bool = True, run_many: RunMany = run_one_by_one,
                 split: SplitShape | None = None, run_heads: RunHeads | None = None, start: Start | None = None,
                 wait_geq: WaitGeq | None = None, copy_share: bool = True, inline_cpu_layers: bool = True):
        self.store, self.cache, self.make_cpu_expert, self.run_many = store, cache, make_cpu_expert, run_many
        self.start = start  # CPU work that can run outside Python starts there (no interpreter lock hand-offs)
        self.wait_geq = wait_geq  # given (CUDA): the GPU, not the host, waits for such work
        self._last: Started | None = None
        # Split experts (None: whole experts only): a lone miss keeps both paths busy instead of one.
        self.split, self.run_heads = (split, run_heads) if run_heads is not None else (None, None)
        self.max_split = cache.scratch_slots  # each split expert is copied into a scratch slot of its own
        self.cost, self.threads = cost, threads
        self.dynamic = dynamic  # split cached layers' misses (False: only CPU layers use the CPU)
        self.copy_share = copy_share  # CPU layers copy some of their experts where the link finishes them earlier
        self.inline_cpu_layers = inline_cpu_layers  # CPU layers compute on the calling thread (else: as any CPU work)
        self._pinned = PinnedRing()
        self.served = None  # the CPU layers' server, where they are served without the host (offload/served.py)
        self._experts: dict[Key, Callable[[torch.Tensor, int], torch.Tensor]] = {}
        # torch's own CPU ops on the worker (int4 kernel, SiLU) get the same thread count
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-offload-cpu",
                                        initializer=torch.set_num_threads, initargs=(threads,))
        self._copy_free_at = 0.0  # host-clock estimate of when the copy queue drains
        self._copies_seen = cache.copy_units
        if cost.smoothing:
            cache.sample_copies = 8  # time one copy in eight to refit copy_ms

    def cpu_expert(self, key: Key) -> Callable[[torch.Tensor, int], torch.Tensor]:
        expert = self._experts.get(key)
        if expert is None:  # cheap: views into the store plus a small struct per matrix
            expert = self._experts[key] = self.make_cpu_expert(self.store.layout.views(self.store.buffer(key)))
        return expert

    # -- the copy queue's backlog ------------------------------------------------------------------
    def _sync_copy_clock(self) -> float:
        """Account for copies enqueued since the last call; returns now (ms)."""
        now = _now_ms()
        new = self.cache.copy_units - self._copies_seen
        self._copies_seen = self.cache.copy_units
        if new and self.cache.cuda:  # elsewhere copies are synchronous: done when enqueued
            self._copy_free_at = max(self._copy_free_at, now) + new * self.cost.copy_ms
        for ms in self.cache.take_copy_samples():
            self.cost.observe_copy(ms)
        return now

    def copy_backlog_ms(self) -> float:
        now = self._sync_copy_clock()
        return max(0.0, self._copy_free_at - now)

    # -- per layer -----------------------------------------------------------------------------------
    def choose(self, misses: Sequence[int]) -> tuple[list[int], int]:
        """(misses for the CPU whole, head): head > 0 splits every miss instead (the CPU computes its first ``head``
        hidden units, the rest is copied), where that finishes the layer earlier than whole experts would."""
        if not misses or not self.dynamic:
            return [], 0
        backlog = self.copy_backlog_ms()
        to_cpu = split_misses(misses, self.cost, backlog)[1]
        if self.split is not None and len(misses) <= self.max_split:
            head, finish = plan_split(len(misses), self.cost, self.split, backlog)
            if head and finish < whole_finish(misses, to_cpu, self.cost, backlog):
                return [], head
        return to_cpu, 0

    def cpu_layer_share(self, experts: Sequence[int], room: int) -> list[int]:
        """Which of a CPU layer's experts the CPU computes: all, or with ``copy_share`` those that ``split_misses``
        gives the CPU over the copy queue's backlog; the others (at most ``room``, the scratch slots) are copied."""
        if not self.copy_share or room <= 0:
            return list(experts)
        to_copy = split_misses(experts, self.cost, self.copy_backlog_ms())[0][:room]
        return [e for e in experts if e not in to_copy]

    def host_input(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, D] as the CPU path's float32 input on the host (on CUDA in a pinned buffer: ``PinnedRing``)."""
        if x.device.type != "cuda":
            return x.detach().to(torch.float32)
        return self._pinned.take(tuple(x.shape), torch.float32).copy_(x.detach())

    def submit(self, layer: int, experts: Sequence[int], x: torch.Tensor, stats: LayerStats, inline: bool = False):
        """Start this layer's CPU experts on x [1, D] (copied to the host here: a few KB); ``expert(e)`` of the result
        then gives [1, D]. ``inline``: a CPU layer, where the GPU has nothing of the layer's to do meanwhile: computed
        on this thread now. (Started for the GPU to wait on instead, CPU layers with device lookup measured slower: 21.7
        against 24.9 tok/s, Mixtral 4/2 at 12 GiB with 14 CPU layers.)"""
        stats.cpu_experts += len(experts)
        stats.misses += len(experts)
        return self._run(layer, list(experts), None, x, stats, inline)

    def submit_heads(self, layer: int, experts: Sequence[int], head: int, x: torch.Tensor, stats: LayerStats):
        """Start the first ``head`` hidden units of these split experts on x [1, D]; ``expert(e)`` then gives [1, head]."""
        return self._run(layer, list(experts), head, x, stats)

    def _run(self, layer: int, experts: list[int], head: int | None, x: torch.Tensor, stats: LayerStats,
             inline: bool = False):
        """Start CPU work (whole experts, or with ``head`` their first hidden units): outside Python where ``start``
        can, and for the GPU to wait on where ``wait_geq`` is given; else on the Python worker thread, or with
        ``inline`` on this one."""
        x_host = self.host_input(x)
        fns = [self.cpu_expert((layer, e)) for e in experts]
        units = len(fns) * (1.0 if head is None else self.split.cpu_share(head))  # experts' worth of bytes read

        def record(ms: float) -> None:
            stats.cpu_ms += ms
            self.cost.observe_cpu(ms, units)

        def run() -> dict[int, torch.Tensor]:
            start = _now_ms()
            outs = (self.run_many(fns, x_host, self.threads) if head is None
                    else self.run_heads(fns, x_host, head, self.threads))
            record(_now_ms() - start)
            return dict(zip(experts, outs))

        self._sync_copy_clock()
        results = functools.partial(CpuResults, device=x.device, dtype=x.dtype, stats=stats,
                                    pinned=self._pinned if x.is_cuda else None)
        if inline:
            start = _now_ms()
            future: Future = Future()
            future.set_result(run())
            stats.cpu_wait_ms += _now_ms() - start
            return results(future)
        signal = self.wait_geq is not None
        started = self.start(fns, x_host, self.threads, head, signal, record) if self.start is not None else None
        self._last = started or self._last
        if started is None:
            return results(self._pool.submit(run))
        if started.signal is not None:
            return SignaledResults(started, experts, self.wait_geq, x.device, x.dtype)
        return results(_Waited(started, experts))

    def close(self) -> None:
        if self.served is not None:
            self.served.close()
        self._pool.shutdown(wait=True)
        if self._last is not None:  # the C worker's last job: its statistics, its buffers
            self._last.wait()


def calibrate(store: ExpertStore, cache: ExpertCache, make_cpu_expert: MakeCpuExpert, threads: int,
              hidden_size: int, key: Key = (0, 0), repeats: int = 5, run_many: RunMany = run_one_by_one) -> CostModel:
    """Measure one expert's copy and CPU times on this machine, the CPU through ``run_many`` as decode calls it. The
    whole call counts as rate (no fixed part): decode refits both from its own calls. (Starting from a fixed part
    measured here, one and two experts per call, the plan gave the CPU 1 miss a token instead of 21-24 and decode lost
    the hybrid's gain: 20.0 tok/s, Mixtral 4/2 at 12 GiB; BENCHMARKS.md, session 8.)"""
    expert = make_cpu_expert(store.layout.views(store.buffer(key)))
    x = torch.randn(1, hidden_size)
    for _ in range(2):  # warm-up: page-in, kernel library load, thread team, scratch (a first call measured 15 ms)
        run_many([expert], x, threads)
    cpu = []
    for _ in range(repeats):
        start = _now_ms()
        run_many([expert], x, threads)
        cpu.append(_now_ms() - start)
    scratch = cache.slots[-1]
    src = store.buffer(key)
    copy = []
    for _ in range(repeats + 1):
        if cache.cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(cache.copy_stream):
                begin.record(cache.copy_stream)
                scratch.copy_(src, non_blocking=True)
                end.record(cache.copy_stream)
            end.synchronize()
            copy.append(begin.elapsed_time(end))
        else:
            start = _now_ms()
            scratch.copy_(src)
            copy.append(_now_ms() - start)
    return CostModel(copy_ms=statistics.median(copy[1:]), cpu_ms=statistics.median(cpu))
