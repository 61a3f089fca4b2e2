"""ExpertCache: a pool of fixed device slots holding experts, filled by copies from the ExpertStore.

Dimension legend: S slots, B bytes of one expert's flat buffer.

A slot is one [B] byte region of a single [S + scratch, B] device allocation; its module (built once by
``make_module`` from typed views into the slot) is what computes the expert, so loading an expert is
one host-to-device copy and never an allocation. Which expert occupies which slot is the policy's
business; this class only moves bytes and orders streams. It knows nothing about model families.

Stream/event protocol (CUDA):
  * copies run on ``copy_stream``, so they overlap compute on the current (compute) stream;
  * before a copy overwrites a slot, the copy stream waits for the slot's ``free`` event: recorded on
    the compute stream once every kernel reading the slot's previous expert was enqueued (marked at the
    next ``module()`` call, since the caller computes one expert at a time), so the overwrite cannot
    race with them, yet need not wait for unrelated compute;
  * after the copy, ``ready[slot]`` is recorded on the copy stream; the compute stream waits on that
    event (``wait_event``, no host sync) right before it first uses the slot;
  * a layer's misses (and a layer's prefetch guesses) are enqueued as one batch: one entry into the copy
    stream and, when one kernel reads them all (grouped decode), one ``ready`` event for the batch.
On a CPU "device" the slots are plain memory and a copy is a synchronous memcpy.
"""

from __future__ import annotations

from typing import Callable, Collection

import torch
from torch import nn

from .policy import CachePolicy, Key
from .stats import CacheStats
from .store import ExpertStore


class ExpertCache:
    def __init__(self, store: ExpertStore, policy: CachePolicy, device: torch.device,
                 make_module: Callable[[dict[str, torch.Tensor]], nn.Module], stats: CacheStats,
                 scratch_slots: int = 1, timing: bool = False):
        self.store, self.policy, self.device, self.stats = store, policy, device, stats
        layout = store.layout
        self.num_slots = policy.num_slots
        total = self.num_slots + scratch_slots  # scratch: for an expert that gets no slot (all protected)
        self.slots = torch.empty((total, layout.nbytes), dtype=torch.uint8, device=device)  # [S, B]
        self.modules = [make_module(layout.views(self.slots[s])) for s in range(total)]
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready: list[torch.cuda.Event | None] = [None] * total
        self.free: list[torch.cuda.Event | None] = [None] * total
        self._unmarked: list[int] = []  # slots handed out whose readers may not all be enqueued yet
        self._scratch = list(range(self.num_slots, total))
        self._scratch_next = 0
        self._staged: dict[Key, int] = {}  # scratch slot already holding (or receiving) an expert (``stage``)
        self.prefetched: set[Key] = set()  # resident because of a prefetch, not yet used
        self.timing = timing and self.cuda
        self._pending_waits: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._waited: torch.cuda.Event | None = None  # the ready event the compute stream waited on last
        self.cpu_recent: set[Key] = set()  # experts the hybrid path computed on the CPU in the latest step
        self._last_ready: torch.cuda.Event | None = None  # recorded after the latest batch of copies
        self.copies = 0  # copies enqueued so far (the hybrid scheduler tracks the copy queue's backlog by it)
        self.sample_copies = 0  # time every n-th copy with CUDA events (0: none); read by take_copy_samples
        self._copy_samples: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []  # (start, end, copies)

    # -- copies -------------------------------------------------------------------------------
    def _copy(self, pairs: list[tuple[Key, int]], together: bool = True) -> None:
        """Copy each (key, slot) pair's expert into its slot: on CUDA one batch on the copy stream.

        A batch enters the copy stream once (top-8 models miss several experts per layer; per-copy stream
        switches cost more host time than the 1-2 MB copies themselves). ``together``: the experts are used
        by one kernel, so one ``ready`` event serves them all; otherwise each gets its own, so computing
        the first need not wait for the last copy (prefill, expert by expert)."""
        if not pairs:
            return
        self.copies += len(pairs)
        if not self.cuda:
            for key, slot in pairs:
                self.slots[slot].copy_(self.store.buffer(key))
            return
        if any(slot in self._unmarked for _, slot in pairs):
            self._mark_used()
        frees = []  # distinct events: a batch's slots were usually freed together
        for _, slot in pairs:
            free = self.free[slot]
            if free is not None and all(free is not f for f in frees):
                frees.append(free)
        sample = bool(self.sample_copies) and self.copies // self.sample_copies != (self.copies - len(pairs)) // self.sample_copies
        with torch.cuda.stream(self.copy_stream):
            for free in frees:
                self.copy_stream.wait_event(free)
            if sample:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.copy_stream)
            for key, slot in pairs:
                self.slots[slot].copy_(self.store.buffer(key), non_blocking=True)
                if not together:
                    self.ready[slot] = torch.cuda.Event()
                    self.ready[slot].record(self.copy_stream)
            ready = torch.cuda.Event(enable_timing=sample)
            ready.record(self.copy_stream)
        self._last_ready = ready
        if sample:
            self._copy_samples.append((start, ready, len(pairs)))
        if together:
            for _, slot in pairs:
                self.ready[slot] = ready

    def copies_idle(self) -> bool:
        """True when every copy enqueued so far has landed (never blocks; CPU copies are synchronous)."""
        return self._last_ready is None or self._last_ready.query()

    def take_copy_samples(self) -> list[float]:
        """Milliseconds per copy of the sampled batches that have finished (never blocks)."""
        done, pending = [], []
        for sample in self._copy_samples:
            (done if sample[1].query() else pending).append(sample)
        self._copy_samples = pending
        return [start.elapsed_time(end) / n for start, end, n in done]

    def _wait(self, slot: int, layer: int) -> None:
        event = self.ready[slot]
        if event is None:
            return
        self.ready[slot] = None  # one wait per copy is enough: later uses are ordered after it
        if event is self._waited:  # a batch's slots share one event: the stream already waits on it
            return
        self._waited = event
        if self.timing:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda.current_stream().wait_event(event)
            end.record()
            self._pending_waits.append((layer, start, end))
        else:
            torch.cuda.current_stream().wait_event(event)

    # -- the two entry points -----------------------------------------------------------------
    def load(self, layer: int, experts: list[int], together: bool = False) -> None:
        """Start copies for this layer's non-resident experts (hits are counted, misses copied).

        ``together``: one kernel will read them all (``slots_for``), so their copies share one event."""
        protected = [(layer, e) for e in experts]
        s = self.stats.layers[layer]
        batch = []
        for key in protected:
            slot = self.policy.slot_of(key)
            if slot is not None:
                self.policy.touch(key)
                s.hits += 1
                if key in self.prefetched:
                    s.prefetch_hits += 1
                    self.prefetched.discard(key)
                continue
            s.misses += 1
            admitted = self.policy.admit(key, protected)
            if admitted is None:
                continue  # gets the scratch slot when it is used
            slot, evicted = admitted
            self.prefetched.discard(evicted)
            batch.append((key, slot))
        self._copy(batch, together)
        s.bytes_copied += len(batch) * self.store.layout.nbytes

    def prefetch(self, layer: int, experts: list[int], protected: Collection[Key]) -> None:
        """Speculatively start copies for guessed experts of a later layer. A wrong guess costs only bytes."""
        s = self.stats.layers[layer]
        batch = []
        for e in experts:
            key = (layer, e)
            if self.policy.slot_of(key) is not None:
                continue
            admitted = self.policy.admit(key, protected)
            if admitted is None:
                break
            slot, evicted = admitted
            self.prefetched.discard(evicted)
            self.prefetched.add(key)
            batch.append((key, slot))
        self._copy(batch)
        s.prefetch_copies += len(batch)
        s.bytes_copied += len(batch) * self.store.layout.nbytes

    def _mark_used(self) -> None:
        """Every reader of the slots handed out so far is enqueued: record when they will be done."""
        if not self._unmarked or not self.cuda:
            self._unmarked.clear()
            return
        event = torch.cuda.Event()
        event.record()
        for slot in self._unmarked:
            self.free[slot] = event
        self._unmarked.clear()

    def module(self, layer: int, expert: int) -> nn.Module:
        """The module computing (layer, expert); the compute stream waits for its copy if needed.

        The caller enqueues the returned module's work before asking for the next one."""
        self._mark_used()
        return self.modules[self._acquire(layer, expert)]

    def slots_for(self, layer: int, experts: list[int]) -> list[int] | None:
        """The slots holding these experts, for one kernel that reads them all (the grouped decode path);
        the compute stream waits for their copies. The caller enqueues that kernel before the next call.

        None when more of them need a scratch slot than there are scratch slots (then go expert by expert)."""
        bypass = sum(self.policy.slot_of((layer, e)) is None for e in experts)
        if bypass > len(self._scratch):
            return None
        self._mark_used()
        return [self._acquire(layer, e) for e in experts]

    def _next_scratch(self) -> int:
        """The next scratch slot in ring order; whatever was staged there is no longer."""
        slot = self._scratch[self._scratch_next]
        self._scratch_next = (self._scratch_next + 1) % len(self._scratch)
        for key in [k for k, v in self._staged.items() if v == slot]:
            del self._staged[key]
        return slot

    def stage(self, layer: int, experts: list[int]) -> None:
        """Prefill: start copying these experts of a later layer (those without a cache slot, in the order they
        will be used) into the scratch slots now, up to one per scratch slot, so that the copy link works while
        this layer computes; their use then finds them there (``_acquire``). Each copy waits, on the copy
        stream, for the enqueued work still reading its scratch slot."""
        todo = [e for e in experts if self.policy.slot_of((layer, e)) is None]
        # The layer's own load() gives its empty slots to the first of them (in this order): those need no staging.
        todo = [e for e in todo[self.policy.free_slots(layer):] if (layer, e) not in self._staged]
        s = self.stats.layers[layer]
        for e in todo[: len(self._scratch)]:
            slot = self._next_scratch()
            self._copy([((layer, e), slot)], together=False)
            self._staged[(layer, e)] = slot
            s.bytes_copied += self.store.layout.nbytes

    def _acquire(self, layer: int, expert: int) -> int:
        key = (layer, expert)
        slot = self.policy.slot_of(key)
        if slot is None:  # no slot could be freed for it: stream it through a scratch slot
            s = self.stats.layers[layer]
            s.bypass += 1
            slot = self._staged.pop(key, None)
            if slot is None:
                slot = self._next_scratch()
                self._copy([(key, slot)])
                s.bytes_copied += self.store.layout.nbytes
        self._wait(slot, layer)
        self._unmarked.append(slot)
        return slot

    def collect_timing(self) -> None:
        """Fold measured copy waits into the stats (synchronizes; call outside the decode loop)."""
        if not self._pending_waits:
            return
        torch.cuda.synchronize(self.device)
        for layer, start, end in self._pending_waits:
            self.stats.layers[layer].wait_ms += start.elapsed_time(end)
        self._pending_waits = []
