"""Telemetry of the expert cache: hits, misses, prefetch precision/recall, bytes, copy waits."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0  # experts not resident when needed (copied on demand)
    prefetch_hits: int = 0  # needed experts resident only thanks to a prefetch
    prefetch_copies: int = 0
    guessed: int = 0  # experts guessed for this layer by the previous layers' look-ahead
    guessed_used: int = 0  # ... of which the router then chose
    needed_guessed: int = 0  # experts this layer needed that had been guessed (numerator of recall)
    needed_with_guess: int = 0  # experts needed in steps where a guess existed (denominator of recall)
    bytes_copied: int = 0
    bypass: int = 0  # needed experts that could not get a slot and used the scratch slot
    in_place: int = 0  # misses the kernels read in place from host memory (device lookup; counted in misses too)
    wait_ms: float = 0.0  # compute-stream time spent waiting for copies (when timing is on)
    cpu_experts: int = 0  # misses computed on the CPU instead of copied (hybrid path; counted in misses too)
    split_experts: int = 0  # misses split: the CPU computed their first hidden units, the GPU the rest from a partial copy
    cpu_ms: float = 0.0  # wall time of the CPU computations (whole and split experts)
    cpu_wait_ms: float = 0.0  # host time spent waiting for a CPU result after the GPU work was enqueued

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0


@dataclass
class CacheStats:
    layers: list[LayerStats] = field(default_factory=list)
    tokens: int = 0  # decode tokens + prefill tokens processed
    host_syncs: int = 0  # routing decisions that reached the host

    @classmethod
    def for_layers(cls, n: int) -> "CacheStats":
        return cls([LayerStats() for _ in range(n)])

    def total(self) -> LayerStats:
        out = LayerStats()
        for layer in self.layers:
            for name in out.__dataclass_fields__:
                setattr(out, name, getattr(out, name) + getattr(layer, name))
        return out

    def summary(self) -> dict[str, float]:
        t = self.total()
        return {
            "hits": t.hits, "misses": t.misses, "hit_rate": t.hit_rate,
            "prefetch_copies": t.prefetch_copies, "prefetch_hits": t.prefetch_hits,
            "prefetch_precision": t.guessed_used / t.guessed if t.guessed else 0.0,
            "prefetch_recall": t.needed_guessed / t.needed_with_guess if t.needed_with_guess else 0.0,
            "bytes_copied": t.bytes_copied,
            "bytes_copied_per_token": t.bytes_copied / self.tokens if self.tokens else 0.0,
            "copy_wait_ms": t.wait_ms, "bypass": t.bypass,
            "in_place_per_token": t.in_place / self.tokens if self.tokens else 0.0,
            "host_syncs_per_token": self.host_syncs / self.tokens if self.tokens else 0.0,
            "cpu_experts": t.cpu_experts,
            "cpu_experts_per_token": t.cpu_experts / self.tokens if self.tokens else 0.0,
            "split_experts_per_token": t.split_experts / self.tokens if self.tokens else 0.0,
            "cpu_ms_per_token": t.cpu_ms / self.tokens if self.tokens else 0.0,
            "cpu_wait_ms_per_token": t.cpu_wait_ms / self.tokens if self.tokens else 0.0,
        }

    def reset(self) -> None:
        for i in range(len(self.layers)):
            self.layers[i] = LayerStats()
        self.tokens = self.host_syncs = 0
