"""CPU layers served without the host: at decode, every CPU layer's experts are handled by a thread of the C kernel
library (kernels.cpu.LayerServer) that the GPU stream signals directly, so a decode step has no Python between its
layers and, with CUDA graphs, is one graph replay.

Per CPU layer at decode the GPU stream (everything below is enqueued, and captured by graphs.py):
  1. writes the layer's input x, its routing and a guess of the next CPU layer's first expert (that layer's router
     applied to this x) into pinned memory, then sets the layer's ``go`` flag;
  2. waits for ``copied``: the server has copied the GPU's share of the experts into scratch slots (an expert copied
     ahead on the previous CPU layer's guess needs no copy), and computes that share from the slots;
  3. waits for ``done``: the server has computed the CPU's share; takes the plan (which rank is where) and the CPU's
     outputs up in one copy, and sums all ranks in float32 in rank order (the grouped path's sum).
Meanwhile the host thread only replays graphs. The previous design (HybridExecutor, OffloadedExperts) synced the host
at every CPU layer and spent about 0.6 ms of Python and launches per layer beside the CPU's work (BENCHMARKS.md,
session 11). The split is fixed per model (``cpu_k`` of the top_k experts on the CPU, chosen from the calibrated cost
model), where the hybrid executor re-decided it per layer from a cost model that could drift (session 13).

Conditions (placement.make_served): every other layer holds all of its experts on the GPU (no layer but the CPU
layers needs the host at decode), and on CUDA the store is pinned and the driver has stream memory operations. Where
the CPU layers' experts take the fused C kernel (4/2's 2-bit group-16 experts) the CPU computes ``cpu_k`` of them;
elsewhere ``cpu_k`` is 0 and the server only copies, so the layers stream their experts with no host sync (4/3 where
no cache fits: planner's fallback in placement.plan_placement). On a CPU device (tests) the same protocol runs
with this thread as the "stream": copies and flag writes happen at once, waits spin.

This module knows experts only as (layer, expert) keys, host buffers and slots.
"""

from __future__ import annotations

import time
from typing import Callable, Protocol, Sequence

import torch

from ..errors import MoeOffloadError
from .cache import ExpertCache
from .stats import CacheStats

Key = tuple[int, int]
Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (x [1, D], slot numbers [n] on the device) -> [n, D]: the experts in those cache slots (SlotKernel.rows)
SlotRows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (rows [K, D], weights [1, K]) -> [1, D]: the weighted sum in rank order (grouped.sum_rows)
SumRows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

WAIT_TIMEOUT_S = 60.0  # a CPU device's wait for the server: far beyond any layer's work


class Signals(Protocol):
    """The stream operations the protocol needs (on CUDA: kernels.host_signal's, enqueued on the current stream)."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None: ...

    def write(self, flag: torch.Tensor, value: int) -> None: ...

    def wait(self, flag: torch.Tensor, value: int) -> None: ...


class HostSignals:
    """On a CPU device the calling thread is the stream: copies and writes happen now, a wait spins."""

    @staticmethod
    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    @staticmethod
    def write(flag: torch.Tensor, value: int) -> None:
        flag.fill_(value)

    @staticmethod
    def wait(flag: torch.Tensor, value: int) -> None:
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while int(flag[0]) < value:
            if time.monotonic() > deadline:
                raise MoeOffloadError("the CPU layer server did not answer within "
                                      f"{WAIT_TIMEOUT_S:.0f} s; use --serve-cpu-layers off")
            time.sleep(0)


def choose_cpu_share(top_k: int, cpu_call_ms: Callable[[int], float], copy_ms: float, max_gpu: int) -> int:
    """How many of a CPU layer's top_k experts the CPU computes: the count whose slower path finishes first (the CPU's
    call against the copies of the rest), with at most ``max_gpu`` on the GPU; a tie goes to the CPU (no copy)."""
    options = range(max(0, top_k - max_gpu), top_k + 1)
    return min(options, key=lambda c: (max(cpu_call_ms(c) if c else 0.0, (top_k - c) * copy_ms), -c))


class ServedCpuLayers:
    """The GPU side of the served CPU layers of one model, and the server behind them.

    ``layers``: the CPU layers' indices (ascending); ``parts(key)``: (gate, up, down) CpuMatrix of an expert (None with
    ``cpu_k`` 0); ``hidden``: D; ``scratch``: cache slot numbers the server may copy into (two sets of
    ``top_k - cpu_k`` where there are enough, else one set, without guesses); ``guess``: with
    ``guess_routers`` (CPU layer -> router of the next CPU layer in the step), copy the next CPU layer's likely first
    expert ahead. ``rows``/``sum_rows``: the grouped kernels on CUDA; None computes the GPU's share expert by expert
    through the cache's slot modules (a CPU device). Injected from the kernels (this package's offload modules import
    none): ``make_server`` (kernels.cpu.LayerServer), and on CUDA ``signals`` (kernels.host_signal's stream operations)
    ``driver_for`` (host_signal.driver_for: what the server's thread needs to copy on a stream of its own), and
    ``own_stream``/``release_stream`` (that stream: host_signal's)."""

    def __init__(self, layers: Sequence[int], cache: ExpertCache, parts: Callable[[Key], tuple] | None, top_k: int,
                 cpu_k: int, scratch: Sequence[int], threads: int, guess_routers: dict[int, Router],
                 sum_rows: SumRows, make_server: Callable[..., object], hidden: int, rows: SlotRows | None = None,
                 guess: bool = True, counts_tokens: bool = True, signals: Signals | None = None,
                 driver_for: Callable[[torch.cuda.Stream], tuple] | None = None,
                 own_stream: Callable[[torch.device], torch.cuda.Stream] | None = None,
                 release_stream: Callable[[torch.cuda.Stream], None] | None = None):
        self.layers, self.cache, self.top_k, self.cpu_k = list(layers), cache, top_k, cpu_k
        self.gpu_k = top_k - cpu_k
        self.index = {layer: i for i, layer in enumerate(self.layers)}
        store = cache.store
        num_experts = max(e for _, e in store.keys()) + 1
        self.cuda = cache.cuda
        if len(scratch) < self.gpu_k:
            raise MoeOffloadError(f"served CPU layers need {self.gpu_k} scratch slots, the cache has {len(scratch)}")
        # Two sets of slots (by CPU layer parity) let the guess for the next layer land beside this layer's share;
        # with room for one set only, every layer uses it and nothing is guessed.
        # (A single CPU layer has no next one to guess for: one set.)
        self.sets = 2 if len(scratch) >= 2 * self.gpu_k and self.gpu_k and len(self.layers) > 1 else 1
        guess = guess and self.sets == 2
        slot_numbers = list(scratch[: self.sets * self.gpu_k])
        # cpu_k 0: the CPU computes nothing (parts None): the server only copies, for experts of any format
        experts = [[parts((layer, e)) for e in range(num_experts)] for layer in self.layers] if cpu_k else None
        sources = [[store.buffer((layer, e)).data_ptr() for e in range(num_experts)] for layer in self.layers]
        n = len(self.layers)
        if self.cuda and (signals is None or driver_for is None or own_stream is None or release_stream is None):
            raise MoeOffloadError("served CPU layers on CUDA need the stream operations (kernels.host_signal)")
        # The server's copies and flag writes release the stream that waits for them: never on that stream, so on one
        # that no other code gets (host_signal.own_stream; a pool stream can come back as the decode's own).
        self.stream = own_stream(cache.device) if self.cuda else None
        self._release_stream = release_stream
        driver = driver_for(self.stream) if self.cuda else None
        self.server = make_server(
            experts, sources, store.layout.nbytes, [cache.slots[s].data_ptr() for s in slot_numbers], top_k, cpu_k,
            parity=[i % self.sets for i in range(n)], next_layer=[i + 1 if i + 1 < n else -1 for i in range(n)],
            threads=threads, guess=guess and bool(guess_routers), pinned=self.cuda, driver=driver, hidden=hidden)
        self.guess_routers = dict(guess_routers) if guess else {}
        D = self.server.hidden
        self.signals = signals if self.cuda else HostSignals()
        device = cache.device
        self.mail = torch.zeros((n, D + top_k + 1), dtype=torch.float32, device=device)
        self.mail.view(torch.int32)[:, D + top_k] = -1  # no guess
        self.plan_y = torch.zeros_like(self.server.plan_y, device=device)
        self.slot_ids = [torch.tensor(slot_numbers[p * self.gpu_k:(p + 1) * self.gpu_k], dtype=torch.int32,
                                      device=device) for p in range(self.sets)]
        self._slot_numbers = slot_numbers
        self.rows, self.sum_rows = rows, sum_rows
        self.counts_tokens = counts_tokens
        self._folded = self.server.stats()
        self.last_fold: dict[str, int] = {k: 0 for k in self._counters(self._folded)}
        self.server.start()
        # The first two passes over the layers (a graph capture's warm-up, or the first eager steps) wait on the host
        # after each of the stream's waits (``_settle``). A kernel's first launch may load its module, and loading
        # can synchronize the whole context: with the stream waiting for the server, and the server's driver calls
        # waiting for that loading, nothing moves. Mixtral 4/3 streamed stalled so at lm_head's first launch in
        # the capture's warm-up (BENCHMARKS.md, session 15; the CUDA documentation's lazy-loading caveat). Once
        # every kernel of a step has run, launches load nothing.
        self._settling = 2 * n if self.cuda else 0

    def ok(self, x: torch.Tensor) -> bool:
        return x.shape[0] == 1 and self.server.running

    def __call__(self, layer: int, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One token's experts of CPU layer ``layer``: x [1, D], indices/weights [1, K] -> [1, D]."""
        i, K, C, G, D = self.index[layer], self.top_k, self.cpu_k, self.gpu_k, self.server.hidden
        sig, server = self.signals, self.server
        mail = self.mail[i]
        mail[:D].copy_(x.reshape(-1))
        routed = mail.view(torch.int32)[D:]
        routed[:K].copy_(indices.reshape(-1))
        router = self.guess_routers.get(layer) if G else None
        if router is not None:
            routed[K:].copy_(router(x)[1].reshape(-1)[:1])
        sig.copy(server.mail[i], mail)
        for flag in (server.copied, server.done):  # last step's answers, long consumed: cleared before asking anew
            sig.write(flag[i:i + 1], 0)
        sig.write(server.go[i:i + 1], 1)
        parts = []
        settle = self._settling > 0 and not torch.cuda.is_current_stream_capturing()
        if settle:
            self._settling -= 1
        if G:
            sig.wait(server.copied[i:i + 1], 1)
            self._settle(settle)
            parts.append(self._gpu_rows(x, i % self.sets))
        sig.wait(server.done[i:i + 1], 1)
        self._settle(settle)
        plan_y = self.plan_y[i]
        sig.copy(plan_y, server.plan_y[i])
        if C:
            parts.append(plan_y[K:].view(torch.float32).view(C, D).to(x.dtype))
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        ranked = torch.empty_like(rows).index_copy_(0, plan_y[:K].long(), rows)
        return self.sum_rows(ranked, weights)

    @staticmethod
    def _settle(settle: bool) -> None:
        """The host waits until the stream has passed its waits: no launch after it finds a wait pending."""
        if settle:
            torch.cuda.current_stream().synchronize()

    def _gpu_rows(self, x: torch.Tensor, parity: int) -> torch.Tensor:
        if self.rows is not None:
            return self.rows(x, self.slot_ids[parity])
        slots = self._slot_numbers[parity * self.gpu_k:(parity + 1) * self.gpu_k]
        return torch.cat([self.cache.modules[s](x) for s in slots])

    def fold(self, stats: CacheStats, resident_layers: Sequence[int] = ()) -> None:
        """Add what the server did since the last fold to the statistics (the host saw none of it): per CPU layer its
        misses (all K), CPU experts and time; the copies' bytes; decode tokens; and the hits of ``resident_layers``
        (layers holding all their experts, looked up on the device: every pick a hit)."""
        now, before = self.server.stats(), self._folded
        served = [a - b for a, b in zip(now["served"], before["served"])]
        ms = [a - b for a, b in zip(now["ms"], before["ms"])]
        self.last_fold = {k: now[k] - before[k] for k in self._counters(now)}
        copies = self.last_fold["copies"]
        self._folded = now
        for layer, count, t in zip(self.layers, served, ms):
            s = stats.layers[layer]
            s.misses += count * self.top_k
            s.cpu_experts += count * self.cpu_k
            s.cpu_ms += t
        if self.layers:
            stats.layers[self.layers[0]].bytes_copied += copies * self.cache.store.layout.nbytes
        tokens = served[0] if served else 0
        if self.counts_tokens:
            stats.tokens += tokens
        for layer in resident_layers:
            stats.layers[layer].hits += tokens * self.top_k

    @staticmethod
    def _counters(stats: dict) -> list[str]:
        return [k for k in stats if k not in ("served", "ms")]

    def decode_counters(self) -> dict[str, int]:
        """The server's counters (copies, guesses, guess_hits, errors) between the last two folds (bench: over
        decode)."""
        return dict(self.last_fold)

    def close(self) -> None:
        self.server.stop()
        if self.stream is not None:
            self._release_stream(self.stream)
            self.stream = None
