"""Decode-time experts chosen on the device: experts stacked in one [E, B] byte buffer, computed for a token
by two grouped kernel launches that read the routing from a device tensor.

Per expert, batch-1 decode costs two kernel launches plus (for the choice) a host sync; at top-8 the
launches dominate. A stack holds experts at a fixed stride (a layer's resident experts, or the offload
cache's slots), so one launch can compute every chosen expert: ``ids`` says which row of the stack each
output row uses. Resident experts then need no host sync at all and a whole decode step fits in one
CUDA graph (graphs.py); offloaded ones still sync once per layer, to copy misses, but launch two kernels
instead of 2K.

Arithmetic: each expert's output is bit-identical to the per-expert kernels (same kernel, same
configuration); the weighted sum runs in float32 in rank order. Resident and offloaded stacks share it,
so offloading still changes no output bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .config import ModelConfig
from .errors import MoeOffloadError
from .flat import FlatLayout
from .model import combine_experts, sum_ranks, sum_ranks_reference
from .quant.hqq import QuantSpec
from .weights import EXPERT_GRAPHS, QuantExpert, build_expert, on_kernels, replay_graph


def grouped_ok(x: torch.Tensor, expert: nn.Module) -> bool:
    """Whether the grouped kernels compute this token (x [T, D]) with experts laid out like ``expert``."""
    if x.shape[0] != 1 or not isinstance(expert, QuantExpert) or not on_kernels(x):
        return False
    spec = expert.gate_proj.spec
    return spec.group_size >= (16 if spec.bits == 3 else 32 // spec.bits)  # the GEMV's word-in-group rule


def stack_prefill_ok(x: torch.Tensor, expert: nn.Module) -> bool:
    """Whether a prefill (x [T, D], T > 1) of a stack laid out like ``expert`` runs as one launch per projection."""
    return x.shape[0] > 1 and isinstance(expert, QuantExpert) and expert.prefill_on_kernels(x)


def stack_prefill(x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, base: QuantExpert, stride: int,
                  num_experts: int, slot_of: torch.Tensor | None = None) -> torch.Tensor:
    """Every expert of a prefill chunk in two launches over a stack (experts ``stride`` bytes apart from ``base``), the
    routing sorted on the device: no host sync, so the host runs ahead of the GPU. ``slot_of`` (int32 [E] on the
    device): expert e lies at stack index slot_of[e] (the offload cache's slots); else at index e. Rows equal
    combine_experts' expert by expert (same kernels, same sum)."""
    order, blocks = kernels.route_blocks(indices, num_experts)
    if slot_of is not None:
        blocks[:, 0] = slot_of[blocks[:, 0].long()]
    pairs = order.numel()
    y = kernels.expert_rows(x, base.gate_proj.qt, base.up_proj.qt, base.down_proj.qt,
                            out=x.new_empty((pairs, x.shape[1])), blocks=blocks, src=order // indices.shape[1],
                            dst=order, pairs=pairs, stack_stride=stride)
    return sum_ranks(y, weights)


def grouped_combine(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, base: QuantExpert,
                    stride: int) -> torch.Tensor:
    """sum_k weights[0, k] * expert_{ids[k]}(x) -> [1, D] for one token, experts at ``stride`` bytes from ``base``.

    No host sync and no data-dependent shapes: capturable in a CUDA graph."""
    y = kernels.grouped_expert_forward(x, ids, base.gate_proj.qt, base.up_proj.qt, base.down_proj.qt, stride,
                                       int8_activations=base.int8_activations)  # [K, D]
    return sum_rows(y, weights)


def sum_rows(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[0, k] * y[k] -> [1, D] in y's dtype, float32 in rank order (one launch where the kernel runs)."""
    from .kernels.fused import weighted_sum

    out = weighted_sum(y, weights.reshape(-1))
    return out if out is not None else sum_ranks_reference(y, weights.reshape(-1))


class StackedExperts(nn.Module):
    """A layer's resident quantized experts in one [E, B] device buffer (filled expert by expert at load).

    Decode on CUDA runs the grouped kernels over the router's own device indices, prefill the prefill kernels over all
    experts at once (kernels/moe_gemm.py); everything else (CPU, fp32) computes expert by expert through
    ``combine_experts`` like ``ResidentExperts``.
    """

    def __init__(self, layout: FlatLayout, config: ModelConfig, spec: QuantSpec, device: torch.device):
        super().__init__()
        self.layout = layout
        self.buffer = torch.empty((config.num_experts, layout.nbytes), dtype=torch.uint8, device=device)  # [E, B]
        self.experts = nn.ModuleList(build_expert(layout.views(self.buffer[e]), config, spec)
                                     for e in range(config.num_experts))
        self.filled: set[int] = set()

    def put(self, expert: int, flat: dict[str, torch.Tensor]) -> None:
        """Copy one expert's tensors (from any device) into its row of the stack."""
        views = self.layout.views(self.buffer[expert])
        if set(views) != set(flat):
            raise MoeOffloadError(f"expert {expert} has tensors {sorted(flat)}, expected {sorted(views)}")
        for name, view in views.items():
            view.copy_(flat[name])
        self.filled.add(expert)

    def decode_on_device(self, x: torch.Tensor) -> bool:
        """True when a decode step's experts are chosen on the device (no host sync): graphs may capture it."""
        return grouped_ok(x, self.experts[0])

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if grouped_ok(x, self.experts[0]):
            return grouped_combine(x, indices.reshape(-1), weights, self.experts[0], self.layout.nbytes)
        if stack_prefill_ok(x, self.experts[0]):
            return self._prefill(x, indices, weights)
        return combine_experts(x, indices, weights, self.experts.__getitem__)

    def _prefill(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return stack_prefill(x, indices, weights, self.experts[0], self.layout.nbytes, len(self.experts))


@dataclass
class PrefillRoute:
    """A prefill chunk's routing on the device (SlotKernel.prefill_route)."""

    order: torch.Tensor  # int64 [P]: pair positions t * K + k sorted by expert
    src: torch.Tensor  # int64 [P]: each sorted pair's token
    tables: torch.Tensor  # int32 [E, nb, 3]: expert e's block table (stack index, first pair, pairs)
    out: torch.Tensor  # [P, D]: each pair's expert output, at its position


class SlotKernel:
    """The offload cache's slots as a stack: one token's experts of a layer in two launches (offload.SlotKernel).

    The host picks the slots (after the layer's one routing sync) and sends their numbers through a pinned
    staging row per layer. That row is safe to rewrite at the next token: the host only gets there after the
    routing sync of that layer, which waits for the stream, copy of the old row included. Inside a graphed
    decode step (``EXPERT_GRAPHS``) the computation replays a CUDA graph per layer and input buffer.
    """

    def __init__(self, base: nn.Module, stride: int, num_layers: int, device: torch.device):
        self.base, self.stride, self.device = base, stride, device
        self._staging: dict[int, torch.Tensor] = {}  # K -> pinned int32 [L, K]
        self._ids: dict[int, torch.Tensor] = {}  # K -> device int32 [L, K]
        self._mixed: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (layer, K, n, dtype) -> (host, device) rows
        self._graphs: dict[tuple, object] = {}  # (layer, K, x ptr, weights ptr) -> see weights.replay_graph
        self.num_layers = num_layers

    def ok(self, x: torch.Tensor) -> bool:
        return grouped_ok(x, self.base)

    def rows(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [1, D] through the experts at stack indices ``ids`` [n] (device) -> [n, D]: two launches, no sync."""
        base = self.base
        return kernels.grouped_expert_forward(x, ids, base.gate_proj.qt, base.up_proj.qt, base.down_proj.qt,
                                              self.stride, int8_activations=base.int8_activations)

    def from_ids(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The experts at stack indices ``ids`` (device; slots, or host memory read in place: device lookup)."""
        return sum_rows(self.rows(x, ids), weights)

    def __call__(self, layer: int, x: torch.Tensor, slots: list[int], weights: torch.Tensor) -> torch.Tensor:
        k = len(slots)
        if k not in self._ids:
            self._staging[k] = torch.empty((self.num_layers, k), dtype=torch.int32, pin_memory=self._pin)
            self._ids[k] = torch.empty((self.num_layers, k), dtype=torch.int32, device=self.device)
        staging, ids = self._staging[k][layer], self._ids[k][layer]
        staging.numpy()[:] = slots  # pinned host row, written in place: no allocation per layer
        ids.copy_(staging, non_blocking=True)
        run = lambda: self.from_ids(x, ids, weights)  # noqa: E731
        return self._replay((layer, k, x.data_ptr(), weights.data_ptr()), run, x)

    def prefill_ok(self, x: torch.Tensor) -> bool:
        return stack_prefill_ok(x, self.base)

    def prefill(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                slot_of: torch.Tensor) -> torch.Tensor:
        """A prefill chunk of a layer whose every expert has a slot (``slot_of``: int32 [E] on the device, expert ->
        slot): all its experts in two launches over the slots (``stack_prefill``, as a resident layer). No host sync,
        so the host runs on and the copies of the layers after it start while it computes. Only where
        ``prefill_ok``."""
        return stack_prefill(x, indices, weights, self.base, self.stride, slot_of.numel(), slot_of)

    def prefill_route(self, x: torch.Tensor, indices: torch.Tensor, num_experts: int) -> PrefillRoute:
        """A prefill chunk's routing sorted on the device, for its experts one at a time (``prefill_expert``)."""
        order, blocks = kernels.route_blocks(indices, num_experts)
        ids = torch.arange(num_experts, device=blocks.device, dtype=blocks.dtype)
        tables = blocks.unsqueeze(0).repeat(num_experts, 1, 1)  # expert e's: the others' blocks emptied
        tables[:, :, 2] *= blocks[None, :, 0] == ids[:, None]
        return PrefillRoute(order, order // indices.shape[1], tables, x.new_empty((order.numel(), x.shape[1])))

    def prefill_expert(self, x: torch.Tensor, route: PrefillRoute, expert: int, slot: int) -> None:
        """Expert ``expert``'s rows of the chunk, from ``slot``, into the route's output rows."""
        base = self.base
        table = route.tables[expert]
        table[:, 0].fill_(slot)
        kernels.expert_rows(x, base.gate_proj.qt, base.up_proj.qt, base.down_proj.qt, out=route.out, blocks=table,
                            src=route.src, dst=route.order, pairs=route.order.numel(), stack_stride=self.stride)

    def prefill_sum(self, route: PrefillRoute, weights: torch.Tensor) -> torch.Tensor:
        return sum_ranks(route.out, weights)

    def mixed(self, layer: int, x: torch.Tensor, weights: torch.Tensor, slots: list[int], ranks: list[int],
              given: dict[int, torch.Tensor]) -> torch.Tensor:
        """A token's K experts of which some were computed elsewhere (a CPU layer's, on the CPU): ranks ``ranks`` run
        from ``slots``, every other rank k's output is ``given[k]`` (host, [D] or [1, D]); their weighted sum [1, D],
        float32 in rank order like ``from_ids``. The given outputs and the slot numbers go up as one pinned row (one
        copy), then the rest is one graph replay in a graphed decode step. Host time per CPU layer on the H100 box:
        0.13 ms with the upload (BENCHMARKS.md, session 11), where the eager combine it replaced took 0.42 ms."""
        K, D, n = weights.numel(), x.shape[-1], len(slots)
        assert len(ranks) == n and len(given) == K - n, (ranks, slots, list(given))
        key = (layer, K, n, x.dtype)
        if key not in self._mixed:
            nbytes = K * D * x.element_size() + 2 * n * 8
            self._mixed[key] = (torch.zeros(nbytes, dtype=torch.uint8, pin_memory=self._pin),
                                torch.zeros(nbytes, dtype=torch.uint8, device=self.device))
        host, dev = self._mixed[key]
        split = K * D * x.element_size()  # [K, D] outputs in x's dtype, then int64 slots and ranks
        host_rows = host[:split].view(x.dtype).view(K, D)
        for k, y in given.items():
            host_rows[k].copy_(y.reshape(-1))
        if n:
            host[split:].view(torch.int64).numpy()[:] = [*slots, *ranks]
        # Safe to rewrite next token: this layer's routing sync comes first, after the copy has long landed.
        dev.copy_(host, non_blocking=True)
        rows, idx = dev[:split].view(x.dtype).view(K, D), dev[split:].view(torch.int64)

        def run() -> torch.Tensor:
            if n:
                rows.index_copy_(0, idx[n:], self.rows(x, idx[:n]))
            return sum_rows(rows, weights)

        return self._replay(("mixed", layer, K, n, x.data_ptr(), weights.data_ptr()), run, x)

    @property
    def _pin(self) -> bool:
        return self.device.type == "cuda"

    def _replay(self, key: tuple, run, x: torch.Tensor) -> torch.Tensor:
        pool = EXPERT_GRAPHS.get()
        if pool is None or not x.is_cuda:
            return run()
        return replay_graph(self._graphs, key, run, x.device, pool)
