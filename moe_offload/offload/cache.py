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
  * split experts (the hybrid path) copy only some byte ranges of an expert into a scratch slot (``load_split``), under
    the same protocol; they take no cache slot and evict nothing.
On a CPU "device" the slots are plain memory and a copy is a synchronous memcpy.

Device lookup (``enable_device_lookup``): a [L, E] table on the device says where each expert is: a slot number,
or the expert's index in host memory counted in expert sizes from slot 0 (the store is aligned for it). A batch-1
kernel then finds a token's experts without the host: a miss is read in place over PCIe. The table follows the cache:
  * an eviction points the old expert back to host memory on the compute stream, and the copy overwriting its slot
    waits for that (every kernel that could still read the slot was enqueued before it);
  * a copy's expert is pointed at its slot on the copy stream, right after the copy: kernels looking it up before see
    host memory, after see the slot, the same bytes either way;
  * an expert whose copy may still be in flight is never evicted, so the two streams never disagree about it.
The kernels log what they looked up (``log``); the host folds it into the statistics and the LRU order later.
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
                 scratch_slots: int = 1, timing: bool = False, slots: torch.Tensor | None = None,
                 prefill_scratch_slots: int = 0):
        self.store, self.policy, self.device, self.stats = store, policy, device, stats
        layout = store.layout
        self.num_slots = policy.num_slots
        # scratch: for an expert that gets no slot (all protected); a prefill also streams through the extra ones
        total = self.num_slots + scratch_slots + prefill_scratch_slots
        if slots is None:  # given: allocated early, so that the store could be aligned to it (device lookup)
            slots = torch.empty((total, layout.nbytes), dtype=torch.uint8, device=device)
        assert tuple(slots.shape) == (total, layout.nbytes) and slots.device.type == device.type, (slots.shape, total)
        self.slots = slots  # [S, B]
        self._make_module = make_module
        self.modules = [make_module(layout.views(self.slots[s])) for s in range(total)]
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready: list[torch.cuda.Event | None] = [None] * total
        self.free: list[torch.cuda.Event | None] = [None] * total
        self._unmarked: list[int] = []  # slots handed out whose readers may not all be enqueued yet
        self._scratch = list(range(self.num_slots, self.num_slots + scratch_slots))
        self._prefill_scratch = list(range(self.num_slots, total))
        self._scratch_next = 0
        # True while a prefill runs (OffloadedExperts): the scratch ring takes the extra slots too. Decode keeps its
        # ring of top_k: its behaviour, tuned with that ring, stays as it was.
        self.prefilling = False
        self._staged: dict[Key, int] = {}  # scratch slot already holding (or receiving) an expert (``stage``)
        self.prefetched: set[Key] = set()  # resident because of a prefetch, not yet used
        self.timing = timing and self.cuda
        self._pending_waits: list[tuple[int, torch.cuda.Event, torch.cuda.Event]] = []
        self._waited: torch.cuda.Event | None = None  # the ready event the compute stream waited on last
        self.cpu_recent: set[Key] = set()  # experts the hybrid path computed on the CPU in the latest step
        self._last_ready: torch.cuda.Event | None = None  # recorded after the latest batch of copies
        self.copies = 0  # whole-expert copies enqueued so far
        self.copy_units = 0.0  # bytes enqueued so far, in expert sizes (the hybrid scheduler's copy backlog)
        self.sample_copies = 0  # time every n-th copy with CUDA events (0: none); read by take_copy_samples
        self._copy_samples: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = []  # (start, end, copies)
        # Device lookup (off until enable_device_lookup): where each expert is, as seen by the kernels.
        self.table: torch.Tensor | None = None  # [L, E] int64 on the device: slot, or host index
        self.log: torch.Tensor | None = None  # [L, 2K] int64: experts looked up, then their table entries; -1: none
        self._host_index: dict[Key, int] = {}
        self._in_flight: dict[Key, torch.cuda.Event] = {}  # copied into a slot, copy maybe not landed
        self._host_modules: dict[int, nn.Module] = {}  # CPU stand-in for in-place reads (module_at)
        self._log_indices: dict[tuple[int, ...], torch.Tensor] = {}  # device index tensors of log rows
        self.collectors: list[Callable[[], None]] = []  # called by collect_timing
        self._slot_tables: dict[int, tuple[list[int], torch.Tensor]] = {}  # layer -> its last slot_table
        self.scratch_shared = False  # True: served CPU layers also copy into the scratch slots (forget_staged)

    # -- copies -------------------------------------------------------------------------------
    def _copy(self, pairs: list[tuple[Key, int]], together: bool = True, evicted: Collection[Key] = (),
              ranges: list[tuple[int, int]] | None = None) -> None:
        """Copy each (key, slot) pair's expert into its slot: on CUDA one batch on the copy stream.

        A batch enters the copy stream once (top-8 models miss several experts per layer; per-copy stream
        switches cost more host time than the 1-2 MB copies themselves). ``together``: the experts are used
        by one kernel, so one ``ready`` event serves them all; otherwise each gets its own, so computing
        the first need not wait for the last copy (prefill, expert by expert). ``evicted``: the experts these
        copies overwrite (device lookup points them back to host memory first). ``ranges``: copy only these byte
        ranges of each buffer (split experts, into scratch slots: never sampled, never in the device table)."""
        if not pairs:
            return
        B = self.store.layout.nbytes
        spans = [(0, B)] if ranges is None else ranges
        self.copy_units += len(pairs) * sum(b - a for a, b in spans) / B
        if ranges is not None:
            assert all(slot >= self.num_slots for _, slot in pairs) and not evicted, "partial copies go to scratch slots"
        else:
            self.copies += len(pairs)
        table = self.table
        if table is not None:
            for key in evicted:
                table[key].fill_(self._host_index[key])  # compute stream: later lookups read host memory
        if not self.cuda:
            for key, slot in pairs:
                for a, b in spans:
                    self.slots[slot][a:b].copy_(self.store.buffer(key)[a:b])
                if table is not None and slot < self.num_slots:
                    table[key].fill_(slot)
            return
        if any(slot in self._unmarked for _, slot in pairs):
            self._mark_used()
        frees = []  # distinct events: a batch's slots were usually freed together
        if table is not None and evicted:
            pointed_back = torch.cuda.Event()
            pointed_back.record()  # after every kernel that could have looked up an evicted expert's slot
            frees.append(pointed_back)
        for _, slot in pairs:
            free = self.free[slot]
            if free is not None and all(free is not f for f in frees):
                frees.append(free)
        sample = (ranges is None and bool(self.sample_copies)
                  and self.copies // self.sample_copies != (self.copies - len(pairs)) // self.sample_copies)
        with torch.cuda.stream(self.copy_stream):
            for free in frees:
                self.copy_stream.wait_event(free)
            if sample:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.copy_stream)
            for key, slot in pairs:
                if ranges is None:
                    self.slots[slot].copy_(self.store.buffer(key), non_blocking=True)
                else:
                    src, dst = self.store.buffer(key), self.slots[slot]
                    for a, b in ranges:
                        dst[a:b].copy_(src[a:b], non_blocking=True)
                if not together:
                    self.ready[slot] = torch.cuda.Event()
                    self.ready[slot].record(self.copy_stream)
            cached = [(key, slot) for key, slot in pairs if slot < self.num_slots] if table is not None else []
            for key, slot in cached:
                table[key].fill_(slot)  # copy stream: kernels find the slot once its bytes are there
            ready = torch.cuda.Event(enable_timing=sample)
            ready.record(self.copy_stream)
        for key, _ in cached:
            self._in_flight[key] = ready
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
        if not experts:  # e.g. a CPU layer at decode
            return
        protected = [(layer, e) for e in experts]
        keep = self._keep(protected)
        s = self.stats.layers[layer]
        batch, evicted = [], []
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
            admitted = self.policy.admit(key, keep)
            if admitted is None:
                continue  # gets the scratch slot when it is used
            slot, old = admitted
            self.prefetched.discard(old)
            batch.append((key, slot))
            evicted += [old] if old is not None else []
        self._copy(batch, together, evicted)
        s.bytes_copied += len(batch) * self.store.layout.nbytes

    def prefetch(self, layer: int, experts: list[int], protected: Collection[Key]) -> None:
        """Speculatively start copies for guessed experts of a later layer. A wrong guess costs only bytes."""
        s = self.stats.layers[layer]
        keep = self._keep(protected)
        batch, evicted = [], []
        for e in experts:
            key = (layer, e)
            if self.policy.slot_of(key) is not None:
                continue
            admitted = self.policy.admit(key, keep)
            if admitted is None:
                break
            slot, old = admitted
            self.prefetched.discard(old)
            self.prefetched.add(key)
            batch.append((key, slot))
            evicted += [old] if old is not None else []
        self._copy(batch, evicted=evicted)
        s.prefetch_copies += len(batch)
        s.bytes_copied += len(batch) * self.store.layout.nbytes

    @property
    def scratch_slots(self) -> int:
        return len(self._scratch)

    @property
    def scratch_slot_numbers(self) -> list[int]:
        """The decode scratch ring's slots."""
        return list(self._scratch)

    def load_split(self, layer: int, experts: list[int], ranges: list[tuple[int, int]]) -> dict[int, int]:
        """Split experts (the hybrid path): copy only ``ranges`` of each one's buffer, each into a scratch slot of its
        own (at most one per scratch slot); the CPU computes the rest. They take no cache slot and evict nothing.
        Counted as misses. -> expert -> scratch slot, for ``split_module``."""
        if len(experts) > len(self._scratch):
            raise ValueError(f"{len(experts)} split experts but {len(self._scratch)} scratch slots")
        pairs = [((layer, e), self._next_scratch()) for e in experts]
        self._copy(pairs, together=False, ranges=ranges)
        s = self.stats.layers[layer]
        s.misses += len(experts)
        s.split_experts += len(experts)
        s.bytes_copied += len(experts) * sum(b - a for a, b in ranges)
        return {e: slot for (_, e), slot in pairs}

    def split_module(self, layer: int, slot: int) -> nn.Module:
        """The module over a split expert's scratch slot (``load_split``); the compute stream waits for its copy."""
        self._mark_used()
        self._wait(slot, layer)
        self._unmarked.append(slot)
        return self.modules[slot]

    # -- device lookup ------------------------------------------------------------------------
    def enable_device_lookup(self, top_k: int) -> None:
        """Build the device table from the cache's state (the store must be aligned to slot 0: ExpertStore.align_to)."""
        keys = self.store.keys()
        num_layers, num_experts = max(l for l, _ in keys) + 1, max(e for _, e in keys) + 1
        base = self.slots.data_ptr()
        table = torch.empty((num_layers, num_experts), dtype=torch.int64)
        for key in keys:
            self._host_index[key] = self.store.index_from(key, base)
            slot = self.policy.slot_of(key)
            table[key] = self._host_index[key] if slot is None else slot
        self.table = table.to(self.device)
        self.log = torch.full((num_layers, 2 * top_k), -1, dtype=torch.int64, device=self.device)

    def lookup(self, layer: int, indices: torch.Tensor) -> torch.Tensor:
        """Where the experts ``indices`` ([1, K] on the device) of ``layer`` are: [K] stack indices, from slot 0
        (slots, then host memory), looked up on the device and logged. No host sync: capturable in a CUDA graph."""
        k = indices.numel()
        row = self.log[layer]
        flat = indices.reshape(-1)
        row[:k].copy_(flat)
        ids = row[k : 2 * k]
        torch.index_select(self.table[layer], 0, flat, out=ids)
        return ids

    def log_rows(self, layers: list[int]) -> torch.Tensor:
        """The logged lookups of these layers, flat on the device, for the caller's host sync (``account_log``)."""
        return self.log[self._log_index(layers)].flatten()

    def account_log(self, layers: list[int], rows: list[int]) -> list[tuple[int, list[int], list[int]]]:
        """(layer, experts, stack indices) of the lookups in ``rows`` (``log_rows(layers)`` on the host) that ran since
        the rows were last read; the rows are cleared (in stream order: lookups enqueued later log again)."""
        w = self.log.shape[1]
        k = w // 2
        out = [(l, rows[i * w : i * w + k], rows[i * w + k : (i + 1) * w]) for i, l in enumerate(layers)
               if rows[i * w] >= 0]
        if out:
            self.log.index_fill_(0, self._log_index(layers), -1)
        return out

    def _log_index(self, layers: list[int]) -> torch.Tensor:
        key = tuple(layers)
        index = self._log_indices.get(key)
        if index is None:
            index = self._log_indices[key] = torch.tensor(layers, dtype=torch.long, device=self.device)
        return index

    def account(self, layer: int, experts: list[int], ids: list[int]) -> None:
        """Fold one logged lookup into the statistics and the LRU order: a slot is a hit, host memory a miss read in
        place."""
        s = self.stats.layers[layer]
        for e, i in zip(experts, ids):
            key = (layer, e)
            if 0 <= i < self.num_slots:
                s.hits += 1
                if self.policy.slot_of(key) is not None:
                    self.policy.touch(key)
                if key in self.prefetched:
                    s.prefetch_hits += 1
                    self.prefetched.discard(key)
            else:
                s.misses += 1
                s.in_place += 1

    def reset_log(self) -> None:
        """Forget logged lookups that did not happen for real (graph warm-up)."""
        if self.log is not None:
            self.log.fill_(-1)

    def module_at(self, index: int) -> nn.Module:
        """The module computing the expert at stack index ``index`` (a slot, or host memory: CPU devices only)."""
        if 0 <= index < len(self.modules):
            return self.modules[index]
        assert not self.cuda, "in-place host reads on CUDA go through the grouped kernels"
        if index not in self._host_modules:
            key = next(k for k, v in self._host_index.items() if v == index)
            self._host_modules[index] = self._make_module(self.store.layout.views(self.store.buffer(key)))
        return self._host_modules[index]

    def _keep(self, protected: Collection[Key]) -> Collection[Key]:
        """``protected`` plus, with device lookup, every expert whose copy may not have landed (never evicted)."""
        if self.table is None:
            return protected
        if self.cuda:
            landed: dict[int, bool] = {}  # a batch's copies share one event: query it once
            for ev in self._in_flight.values():
                if id(ev) not in landed:
                    landed[id(ev)] = ev.query()
            self._in_flight = {k: ev for k, ev in self._in_flight.items() if not landed[id(ev)]}
        else:
            self._in_flight.clear()
        return [*protected, *self._in_flight] if self._in_flight else protected

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
        return self.modules[self.slot(layer, expert)]

    def slot(self, layer: int, expert: int) -> int:
        """The slot holding (layer, expert), for a kernel that reads the slots as a stack (``module`` for one that
        takes its module); the compute stream waits for its copy if needed. The caller enqueues that kernel before the
        next call."""
        self._mark_used()
        return self._acquire(layer, expert)

    def slot_table(self, layer: int, slots: list[int]) -> torch.Tensor:
        """``slots`` as int32 on the device: uploaded when they differ from this layer's last ones."""
        kept = self._slot_tables.get(layer)
        if kept is None or kept[0] != slots:
            kept = self._slot_tables[layer] = (list(slots), torch.tensor(slots, dtype=torch.int32).to(self.device))
        return kept[1]

    def slots_for(self, layer: int, experts: list[int]) -> list[int] | None:
        """The slots holding these experts, for one kernel that reads them all (the grouped decode path);
        the compute stream waits for their copies. The caller enqueues that kernel before the next call.

        None when more of them need a scratch slot than there are scratch slots (then go expert by expert)."""
        bypass = sum(self.policy.slot_of((layer, e)) is None for e in experts)
        if bypass > len(self._scratch):
            return None
        self._mark_used()
        return [self._acquire(layer, e) for e in experts]

    @property
    def _ring(self) -> list[int]:
        return self._prefill_scratch if self.prefilling else self._scratch

    def _next_scratch(self) -> int:
        """The next scratch slot in ring order; whatever was staged there is no longer."""
        ring = self._ring
        self._scratch_next %= len(ring)
        slot = ring[self._scratch_next]
        self._scratch_next = (self._scratch_next + 1) % len(ring)
        for key in [k for k, v in self._staged.items() if v == slot]:
            del self._staged[key]
        return slot

    def forget_staged(self) -> None:
        """Drop the record of experts staged into scratch slots: something else (served CPU layers) wrote there. On
        CUDA the copies enqueued from now on also wait for the work enqueued so far, which may still read those slots
        (served decode steps track no ``free`` events)."""
        self._staged.clear()
        if self.cuda:
            self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))

    def drain_copies(self) -> None:
        """The compute stream waits for every copy enqueued so far: a prefill's copies into the scratch slots have
        landed before the served CPU layers' own copies go there."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)

    def stage(self, layer: int, experts: list[int]) -> None:
        """Start copying these experts (those without a cache slot, in the order they will be used) into the scratch
        slots now, up to one per scratch slot, so that the copy link works meanwhile: prefill stages a later layer's
        while this layer computes, a CPU layer the experts it leaves to the GPU while the CPU computes the others.
        Their use then finds them there (``_acquire``). Each copy waits, on the copy
        stream, for the enqueued work still reading its scratch slot."""
        todo = [e for e in experts if self.policy.slot_of((layer, e)) is None]
        # The layer's own load() gives its empty slots to the first of them (in this order): those need no staging.
        todo = [e for e in todo[self.policy.free_slots(layer):] if (layer, e) not in self._staged]
        s = self.stats.layers[layer]
        for e in todo[: len(self._ring)]:
            slot = self._next_scratch()
            self._copy([((layer, e), slot)], together=False)
            self._staged[(layer, e)] = slot
            s.bytes_copied += self.store.layout.nbytes

    def is_staged(self, key: Key) -> bool:
        """Whether ``stage`` put this expert into a scratch slot that still holds it (or is receiving it)."""
        return key in self._staged

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
        """Fold measured copy waits, and what ``collectors`` report (work done without the host: served CPU layers),
        into the stats (synchronizes; call outside the decode loop)."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for collect in self.collectors:
            collect()
        for layer, start, end in self._pending_waits:
            self.stats.layers[layer].wait_ms += start.elapsed_time(end)
        self._pending_waits = []
