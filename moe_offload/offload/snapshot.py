"""Where every expert is right now: a picture of the ExpertCache for the server's live expert view.

Read-only and family-agnostic: it sees only (layer, expert) keys, the policy's resident set and the
copy events. The server calls it from its event-loop thread while the worker thread decodes and mutates
the cache, so the shared sets are copied with a few retries instead of a lock the decode loop would pay
for on every expert ("... changed size during iteration" is the only failure; a retry sees a newer state).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from .cache import ExpertCache
from .policy import Key

# One letter per expert keeps a 60 x 256 grid (DeepSeek-sized) near 15 KB of JSON.
RESIDENT, PREFETCHED, COPYING, HOST, CPU = "g", "f", "c", "h", "p"
LEGEND = {
    RESIDENT: "resident on the GPU",
    PREFETCHED: "resident on the GPU, prefetched and not used yet",
    COPYING: "being copied to the GPU",
    HOST: "in host memory only",
    CPU: "computed on the CPU",
}
RETRIES = 20
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ExpertSnapshot:
    layers: tuple[int, ...]  # indices of the layers that have experts, ascending
    num_experts: int
    grid: tuple[str, ...]  # per layer in ``layers``: one state letter per expert

    def counts(self) -> dict[str, int]:
        return {state: sum(row.count(state) for row in self.grid) for state in LEGEND}

    def state(self, layer: int, expert: int) -> str:
        return self.grid[self.layers.index(layer)][expert]


def resident_snapshot(layers: Iterable[int], num_experts: int) -> ExpertSnapshot:
    """A model without offloading: every expert of every MoE layer is resident."""
    layers = tuple(layers)
    return ExpertSnapshot(layers, num_experts, tuple(RESIDENT * num_experts for _ in layers))


def snapshot(cache: ExpertCache) -> ExpertSnapshot:
    """The state of every expert the cache's store holds (safe to call from another thread)."""
    keys = list(cache.store.keys())  # fixed after loading
    resident = _retry(cache.policy.resident)
    prefetched = _retry(lambda: set(cache.prefetched))
    cpu = _cpu_keys(cache)
    layers = sorted({layer for layer, _ in keys})
    num_experts = 1 + max((e for _, e in keys), default=-1)
    rows = {layer: [HOST] * num_experts for layer in layers}
    for key in keys:
        rows[key[0]][key[1]] = _state(cache, key, resident, prefetched, cpu)
    return ExpertSnapshot(tuple(layers), num_experts, tuple("".join(rows[layer]) for layer in layers))


def _state(cache: ExpertCache, key: Key, resident: set[Key], prefetched: set[Key], cpu: set[Key]) -> str:
    if key in resident:
        slot = cache.policy.slot_of(key)
        if slot is not None and _copying(cache.ready[slot]):
            return COPYING
        return PREFETCHED if key in prefetched else RESIDENT
    return CPU if key in cpu else HOST


def _copying(event: Any) -> bool:
    # ready[slot] is None once compute has waited on it (and always on a CPU device); a recorded
    # event still counts as copying until the copy stream has passed it.
    return event is not None and not event.query()


def _cpu_keys(cache: ExpertCache) -> set[Key]:
    """Experts the hybrid CPU path computed lately, if this cache has one (``cpu_recent``)."""
    recent = getattr(cache, "cpu_recent", None)
    if recent is None:
        return set()
    source = recent if callable(recent) else (lambda: recent)
    try:
        return {tuple(k) for k in _retry(lambda: list(source()))}
    except TypeError:  # not an iterable of (layer, expert) keys: show no CPU state rather than fail
        return set()


def _retry(read: Callable[[], T]) -> T:
    for _ in range(RETRIES - 1):
        try:
            return read()
        except RuntimeError as e:  # the worker resized the set or dict while we iterated: read again
            if "during iteration" not in str(e):
                raise
    return read()
