"""OffloadedExperts: one layer's Experts provider over the ExpertCache, with speculative prefetch.

The engine builds one per MoE layer and hands it the routers of the next ``depth`` layers: applying
them to this layer's hidden state guesses which experts those layers will want, and their copies start
now, on the copy stream, while this layer computes. Guesses only move bytes: outputs never change.

Device lookup (``device_lookup``, with CPU layers): at decode the layers between two CPU layers never reach the host.
Their kernels look their experts up in the cache's device table, and read a miss in place from host memory; a whole
run of such layers is one CUDA graph (graphs.py). The CPU layers are the host's points of contact: each folds the
lookups logged since the previous one into the statistics and the LRU order (``catch_up``), and starts copies of its
guesses for the layers up to the next CPU layer, which then find them in their slots once landed.
"""

from __future__ import annotations

import os
from typing import Callable, Protocol, Sequence

import torch

from .cache import ExpertCache
from .hybrid import HybridExecutor

# combine(x, indices, weights, expert_fn, experts) -> y: the model's own combination, injected so that
# offloaded and resident experts share one arithmetic (and this package never imports the model).
Combine = Callable[..., torch.Tensor]
Router = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# A prefill chunk with at least this many expert picks per expert (tokens x top-k / experts) is taken to need every
# expert of the next layer too (Mixtral, top-2 of 8: 16 tokens): those without a slot are staged early.
STAGE_MIN_PICKS_PER_EXPERT = 4
# MOE_OFFLOAD_PREFILL_ON_DEVICE=0: every prefill chunk's routing goes to the host, and experts are computed expert by
# expert through the model's combine (the older way; benchmarks' A/B). Read once.
PREFILL_ON_DEVICE = os.environ.get("MOE_OFFLOAD_PREFILL_ON_DEVICE", "1") != "0"


class SlotKernel(Protocol):
    """Computes one token's experts straight from the cache's slots in one go (grouped kernels)."""

    def ok(self, x: torch.Tensor) -> bool: ...

    def __call__(self, layer: int, x: torch.Tensor, slots: list[int], weights: torch.Tensor) -> torch.Tensor: ...

    def from_ids(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...

    def mixed(self, layer: int, x: torch.Tensor, weights: torch.Tensor, slots: list[int], ranks: list[int],
              given: dict[int, torch.Tensor]) -> torch.Tensor: ...

    def prefill_ok(self, x: torch.Tensor) -> bool: ...

    def prefill(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                slot_of: torch.Tensor) -> torch.Tensor: ...

    def prefill_route(self, x: torch.Tensor, indices: torch.Tensor, num_experts: int): ...

    def prefill_expert(self, x: torch.Tensor, route, expert: int, slot: int) -> None: ...

    def prefill_sum(self, route, weights: torch.Tensor) -> torch.Tensor: ...


class OffloadedExperts:
    def __init__(self, layer: int, cache: ExpertCache, combine: Combine,
                 lookahead: Sequence[tuple[int, Router]] = (), guesses: dict[int, set[int]] | None = None,
                 counts_tokens: bool = False, hybrid: HybridExecutor | None = None, grouped: SlotKernel | None = None,
                 cpu_only: bool = False, num_experts: int = 0, last_layer: bool = True, device_lookup: bool = False,
                 catch_up: Sequence[int] = (), stage_ahead: tuple[int, Router] | None = None, top_k: int = 0):
        self.layer, self.cache, self.combine, self.hybrid, self.grouped = layer, cache, combine, hybrid, grouped
        # A CPU layer: at decode the CPU computes its experts (it has no slots; prefill streams its experts through
        # the scratch slots like any miss, and decode may copy some of them there: HybridExecutor.cpu_layer_share).
        self.cpu_only = cpu_only
        # Prefill: when a chunk is long enough to use every expert, the next layer's experts without a slot are
        # staged into the scratch slots while this layer computes (ExpertCache.stage).
        self.num_experts, self.last_layer, self.top_k = num_experts, last_layer, top_k
        assert not cpu_only or hybrid is not None, "a CPU layer needs the CPU path"
        self.lookahead = list(lookahead)  # (layer index, router) of the next layers to prefetch for
        self.guesses = {} if guesses is None else guesses  # shared by all layers: layer -> guessed experts
        self.counts_tokens = counts_tokens  # the first layer to reach the host counts tokens for per-token stats
        # Device lookup: this layer's decode looks its experts up on the device (a CPU layer never does).
        self.device_lookup = device_lookup and not cpu_only
        self.catch_up = list(catch_up)  # a CPU layer: the device-lookup layers since the previous CPU layer
        # A CPU layer sharing its experts with the copy link: (next CPU layer, its router). Once this layer's work is
        # enqueued, the expert that router ranks first on this layer's hidden state is copied into a scratch slot, so
        # that the next CPU layer finds the GPU's share of its experts there, or on its way, when its routing is known.
        self.stage_ahead = stage_ahead if cpu_only else None
        self._staging: tuple[int, int] | None = None
        # Served (offload/served.py; set by placement.make_served): this CPU layer's decode goes to a C thread that the
        # GPU stream signals, with no host sync and no Python (a graphed decode step captures it).
        self.served = None
        self._prologue: torch.Tensor | None = None  # use_prologue
        self._ahead_sizes: list[int] = []  # entries of each look-ahead guess in the prologue

    def decode_on_device(self, x: torch.Tensor) -> bool:
        """True when this layer's decode needs no host (graphs.py may capture it with its neighbours)."""
        if self.served is not None:
            return self.served.ok(x)
        return self.device_lookup and x.shape[0] == 1 and self.grouped is not None and self.grouped.ok(x)

    def after_capture(self) -> None:
        """Graph capture ran this layer's lookups for show: forget them."""
        if self.device_lookup:
            self.cache.reset_log()

    def decode_prologue(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """What this layer brings to the host in its one sync, flat int64 on the device, computed from the router's
        output alone: the routing, at decode the look-ahead guesses (the staged guess last among them), and the lookups
        logged since the previous CPU layer. A graphed decode step (graphs.py) computes it inside its graph and hands it
        over (``use_prologue``): no eager launches between the router and the sync.

        Look ahead at decode only: a prefill chunk needs nearly every expert of every layer, and guessed copies for the
        next layer would queue ahead of this layer's own (BENCHMARKS.md: 891 -> 1517 tok/s)."""
        parts = [indices.flatten()]
        if x.shape[0] == 1:
            parts += [router(x)[1].flatten() for _, router in self.lookahead]  # [K], or wider (placement.widened)
            self._ahead_sizes = [p.numel() for p in parts[1:]]
            if self.stage_ahead is not None:
                parts.append(self.stage_ahead[1](x)[1][:, :1].flatten())  # the next CPU layer's first choice
        if self.catch_up:
            parts.append(self.cache.log_rows(self.catch_up))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def use_prologue(self, prologue: torch.Tensor) -> None:
        """The next decode call's ``decode_prologue``, already computed (in a replayed graph)."""
        self._prologue = prologue

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        y = self._experts(x, indices, weights)
        if self.last_layer and x.shape[0] > 1 and self.cache.scratch_shared:
            self.cache.drain_copies()  # a prefill's copies land before a served decode step copies into the scratch
        if self._staging is not None:  # a CPU layer's guess for the next one (stage_ahead)
            layer, expert = self._staging
            self._staging = None
            self.cache.stage(layer, [expert])
        return y

    def begin(self, tokens: int) -> None:
        """The model is about to enqueue a forward of ``tokens`` new tokens (MoeTransformer.before_forward; the first
        MoE layer's provider). A prefill first forgets what was staged in the scratch slots (served decode steps may
        have written there; the copies from now on wait for the work enqueued so far, none of it this forward's). A
        chunk that uses every expert then starts copying this layer's experts that have no slot, so that they cross
        the link beside the embedding and the attention before them: they waited for this layer's attention, 5-6 ms of
        an idle link per 512-token prefill at 2580 MiB (BENCHMARKS.md, session 16)."""
        if tokens <= 1:
            return
        cache = self.cache
        if cache.scratch_shared:
            cache.forget_staged()
        if self._uses_all(tokens, tokens * self.top_k):
            cache.prefilling = True
            cache.stage(self.layer, list(range(self.num_experts)))

    def _experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        cache, stats = self.cache, self.cache.stats
        if self.served is not None and self.served.ok(x):  # statistics: ServedCpuLayers.fold
            return self.served(self.layer, x, indices, weights)
        cache.prefilling = x.shape[0] > 1  # a prefill streams through the wider scratch ring (placement.py)
        if self.counts_tokens:
            stats.tokens += x.shape[0]
            if self.hybrid is not None:
                cache.cpu_recent = set()  # a new step: the live expert view shows this step's CPU experts
        if self.device_lookup and x.shape[0] == 1:
            return self._looked_up(x, indices, weights)
        if self._uses_all(x.shape[0], indices.numel()):
            y = self._prefill_on_device(x, indices, weights)
            if y is not None:
                return y
        decode = x.shape[0] == 1
        lookahead = self.lookahead if decode else []
        stage_ahead = self.stage_ahead if decode else None
        prologue, self._prologue = self._prologue, None
        flat = (prologue if prologue is not None and decode else self.decode_prologue(x, indices)).tolist()
        stats.host_syncs += 1
        n = indices.numel()
        used = sorted(set(flat[:n]))
        if self.catch_up:  # after the sync: every lookup before this layer has run
            width = len(self.catch_up) * cache.log.shape[1]
            rows, flat = flat[len(flat) - width:], flat[: len(flat) - width]
            for layer, experts, ids in cache.account_log(self.catch_up, rows):
                self._score_guess(layer, sorted(set(experts)))
                cache.account(layer, experts, ids)
        self._score_guess(self.layer, used)
        on_cpu: list[int] = []
        split: list[int] = []  # misses whose first hidden units the CPU computes while the rest is copied
        head = 0
        if self.hybrid is not None and x.shape[0] == 1:  # decode only: CPU cost grows with tokens, a copy's does not
            if self.cpu_only:  # experts staged by the previous CPU layer's guess are the GPU's; the rest is split
                staged = [e for e in used if cache.is_staged((self.layer, e))]
                rest = [e for e in used if e not in staged]
                on_cpu = self.hybrid.cpu_layer_share(rest, cache.scratch_slots - len(staged))
                cache.stage(self.layer, [e for e in rest if e not in on_cpu])  # copied now, beside the CPU's work
            else:
                misses = [e for e in used if cache.policy.slot_of((self.layer, e)) is None]
                on_cpu, head = self.hybrid.choose(misses)
                split = misses if head else []
        # A CPU layer computes on this thread, after its guesses' copies start (or, with inline_cpu_layers off, like
        # any CPU work: the host enqueues the rest of the step meanwhile).
        inline = self.cpu_only and bool(on_cpu) and self.hybrid.inline_cpu_layers
        if on_cpu and not inline:  # started first, so the CPU works while the GPU computes hits and copied misses
            results = self.hybrid.submit(self.layer, on_cpu, x, stats.layers[self.layer])
        if split:
            results = self.hybrid.submit_heads(self.layer, split, head, x, stats.layers[self.layer])
            split_slots = cache.load_split(self.layer, split, self.hybrid.split.ranges(head))
        if on_cpu:
            cache.cpu_recent = cache.cpu_recent | {(self.layer, e) for e in on_cpu}  # new set: readers copy-free
        on_gpu = [e for e in used if e not in on_cpu and e not in split]
        grouped = not on_cpu and not split and self.grouped is not None and self.grouped.ok(x)  # two launches in all
        cache.load(self.layer, on_gpu, together=grouped)  # this layer's misses first: they are needed soonest
        protected = [(self.layer, e) for e in used]
        # Guesses are copied only while the copy queue is idle: when copies set the pace, a speculative copy
        # takes the link from a needed one and a wrong guess (~1 in 5) is pure loss (BENCHMARKS.md, session 4).
        # They are still recorded, so prefetch recall stays measured.
        # A CPU layer speculates whatever the queue holds: its own experts need no copy, and its CPU time is long.
        # (Letting split layers speculate behind their own copies measured slower: 11.8 against 22.3 tok/s, 12 GiB.)
        speculate = bool(lookahead) and (self.cpu_only or cache.copies_idle())  # no event query when prefetch is off
        start = n
        for (layer, _), size in zip(lookahead, self._ahead_sizes):
            guess = sorted(set(flat[start : start + size]))
            start += size
            self.guesses[layer] = self.guesses.get(layer, set()) | set(guess)
            if speculate:
                cache.prefetch(layer, guess, protected)
            protected = protected + [(layer, e) for e in guess]
        if stage_ahead is not None:  # staged by __call__ once this layer's reads of the scratch slots are enqueued
            layer, guess = stage_ahead[0], flat[-1]
            self._staging = (layer, guess)
            self.guesses[layer] = self.guesses.get(layer, set()) | {guess}
        if inline:
            results = self.hybrid.submit(self.layer, on_cpu, x, stats.layers[self.layer], inline=True)
            if self.grouped is not None and self.grouped.ok(x):
                y = self._mixed(x, weights, flat[:n], on_cpu, results)
                if y is not None:
                    return y
        if split:
            def expert(e: int):
                if e not in split:
                    return cache.module(self.layer, e)
                module = cache.split_module(self.layer, split_slots[e])
                return lambda x_: module.forward_with_head(x_, head, lambda: results.expert(e)(x_))

            return self.combine(x, indices, weights, expert, flat[:n], last=split)
        if not on_cpu:
            if grouped:
                slots = cache.slots_for(self.layer, flat[:n])  # rank order, as the router gave them
                if slots is not None:
                    return self.grouped(self.layer, x, slots, weights)
            y = self.combine(x, indices, weights, lambda e: cache.module(self.layer, e), flat[:n])
            if not self.last_layer and self._uses_all(x.shape[0], indices.numel()):
                cache.stage(self.layer + 1, list(range(self.num_experts)))  # all of this layer's work is enqueued
            return y
        return self.combine(x, indices, weights,
                            lambda e: results.expert(e) if e in on_cpu else cache.module(self.layer, e),
                            flat[:n], last=on_cpu)

    def _uses_all(self, tokens: int, picks: int) -> bool:
        """A prefill chunk (``picks``: tokens x top-k) long enough to use every expert of this layer (and of the next)."""
        return tokens > 1 and self.num_experts > 0 and picks >= STAGE_MIN_PICKS_PER_EXPERT * self.num_experts

    def _prefill_on_device(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor | None:
        """A prefill chunk that uses every expert, with the routing sorted on the device (SlotKernel.prefill*): no
        routing sync, so the host enqueues the layers after it at once, and the copy link never waits for the host at
        a layer's start. A layer whose experts all have slots is two launches over them; otherwise each expert is
        copied (into its cache slot, or through the scratch ring) and computed in turn, from wherever it landed.
        Before, each layer's sync put the host's work between the GPU's layers: the link idled through layers that
        hold all their experts and at every layer's start (BENCHMARKS.md, session 15). Counted as if every expert were
        used. None: computed the usual way (routing on the host)."""
        if not PREFILL_ON_DEVICE or self.grouped is None or not self.grouped.prefill_ok(x):
            return None
        cache, experts = self.cache, list(range(self.num_experts))
        self.guesses.pop(self.layer, None)
        cache.load(self.layer, experts)  # hits counted; misses that get a cache slot copied now, in order
        if all(cache.policy.slot_of((self.layer, e)) is not None for e in experts):
            table = cache.slot_table(self.layer, [cache.slot(self.layer, e) for e in experts])
            y = self.grouped.prefill(x, indices, weights, table)
        else:
            route = self.grouped.prefill_route(x, indices, self.num_experts)
            for e in experts:  # a streamed expert's scratch slot is reused two or more experts later: one at a time
                self.grouped.prefill_expert(x, route, e, cache.slot(self.layer, e))
            y = self.grouped.prefill_sum(route, weights)
        if not self.last_layer:
            cache.stage(self.layer + 1, experts)
        return y

    def _mixed(self, x: torch.Tensor, weights: torch.Tensor, routed: list[int], on_cpu: list[int],
               results) -> torch.Tensor | None:
        """A CPU layer's finish once its CPU experts are done: their outputs and the GPU's share (in scratch slots)
        summed by one grouped call (SlotKernel.mixed). None: the GPU's share does not fit the scratch slots."""
        ranks = [k for k, e in enumerate(routed) if e not in on_cpu]
        slots = self.cache.slots_for(self.layer, [routed[k] for k in ranks]) if ranks else []
        if slots is None:
            return None
        outputs = results.on_host()
        given = {k: outputs[e] for k, e in enumerate(routed) if e in on_cpu}
        return self.grouped.mixed(self.layer, x, weights, slots, ranks, given)

    def _looked_up(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decode with device lookup: no host sync (the statistics catch up at the next CPU layer)."""
        ids = self.cache.lookup(self.layer, indices)
        if self.grouped is not None and self.grouped.ok(x):
            return self.grouped.from_ids(x, ids, weights)
        # No grouped kernels (a CPU device): the same lookup, computed expert by expert.
        where = dict(zip(indices.reshape(-1).tolist(), ids.tolist()))
        return self.combine(x, indices, weights, lambda e: self.cache.module_at(where[e]), list(where))

    def _score_guess(self, layer: int, used: list[int]) -> None:
        guess = self.guesses.pop(layer, None)
        if guess is None:
            return
        s = self.cache.stats.layers[layer]
        hit = len(guess.intersection(used))
        s.guessed += len(guess)
        s.guessed_used += hit
        s.needed_guessed += hit
        s.needed_with_guess += len(used)
