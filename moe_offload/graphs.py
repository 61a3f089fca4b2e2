"""Batch-1 decode replayed from CUDA graphs, in segments that end where the host must decide.

Eager decode issues ~60 small kernels per layer from Python; at batch 1 the host, not the GPU, sets the pace. Here
everything runs as captured graphs over static buffers (the position lives in a device tensor, attention spans the
whole KV cache under a mask). A layer whose routed experts are picked on the host (offloaded experts copied on a
miss, a CPU layer, a routing hook) ends a segment: the graph runs up to its router (and, for an offloaded layer,
computes what the layer's host sync will read: ``decode_prologue``), its experts run eagerly, and the next graph
starts from their output. Quantized experts that run eagerly replay graphs of their own (see
weights.QuantExpert, grouped.SlotKernel), keyed by their static input buffer.

Layers whose experts are picked on the device (resident quantized stacks, grouped.py; offloaded layers with device
lookup, offload/experts.py) need no host: with no host layer at all, the whole step, lm_head included, is one graph.
"""

from __future__ import annotations

import torch

from . import kernels
from .kv_cache import KVCache
from .model import MoeTransformer, Pending, rope_cos_sin
from .weights import EXPERT_GRAPHS


class GraphedDecode:
    def __init__(self, model: MoeTransformer, kv: KVCache, use_graphs: bool = True):
        c = model.config
        self.model, self.kv, self.device, self.dtype = model, kv, model.device, model.dtype
        M, D = kv.max_len, c.hidden_size
        self.pos = torch.full((1,), M - 1, dtype=torch.long, device=self.device)  # capture writes the last slot
        self.positions = torch.arange(M, device=self.device)
        self.mask = torch.ones(1, M, dtype=torch.bool, device=self.device)  # [S=1, M]
        # RoPE tables of the step's position: computed once per step (in layer 0), read by every layer.
        self.cos = torch.zeros(1, 1, 1, c.head_dim, dtype=self.dtype, device=self.device)
        self.sin = torch.zeros_like(self.cos)
        self.x = [torch.zeros(1, 1, D, dtype=self.dtype, device=self.device) for _ in range(c.num_layers + 1)]
        self.use_graphs = use_graphs and self.device.type == "cuda"
        if self.device.type == "cuda" and kernels.available():  # attention over keys <= pos, not the whole cache
            from .kernels.attention import decode_attention_if_supported

            for layer in model.layers:
                layer.self_attn.decode_attention = decode_attention_if_supported
        self.expert_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # Host layers: their experts are picked on the host. A routing hook (routing.py: trace recording or replay)
        # runs Python between router and experts, so its layer is one too.
        probe = self.x[0].view(1, D)
        self.host_layers = [i for i, layer in enumerate(model.layers) if layer.moe is not None and not (
            layer.moe.routing_hook is None
            and getattr(layer.moe.experts, "decode_on_device", lambda _: False)(probe))]
        # Segment j runs layers first..host-1 whole, then layer ``host`` up to its router (host None: to the logits).
        firsts = [0] + [h + 1 for h in self.host_layers]
        self.segments: list[tuple[int, int | None]] = list(zip(firsts, [*self.host_layers, None]))
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.outputs: list[Pending | torch.Tensor] = []
        # An offloaded host layer's ``decode_prologue`` (offload/experts.py), computed at the end of its segment.
        self.prologues: dict[int, torch.Tensor] = {}
        if self.use_graphs:
            self._capture()

    @torch.inference_mode()
    def _dense(self, i: int) -> Pending:
        """Layer i up to its routed experts (attention, norms, router, shared expert; all of a dense layer)."""
        c, layer = self.model.config, self.model.layers[i]
        if i == 0:
            cos, sin = rope_cos_sin(self.pos.view(1, 1), c.head_dim, c.rope_theta, self.dtype)
            self.cos.copy_(cos)
            self.sin.copy_(sin)
        return layer.prepare(self.x[i], self.cos, self.sin, self.kv, self.pos, self.mask)

    @torch.inference_mode()
    def _segment(self, j: int) -> Pending | torch.Tensor:
        """Segment j's work: its host layer's Pending, or the last segment's float32 logits [V]."""
        model = self.model
        first, host = self.segments[j]
        for i in range(first, len(model.layers) if host is None else host):
            model.layers[i].finish(self._dense(i), out=self.x[i + 1])
        if host is not None:
            pending = self._dense(host)
            moe = model.layers[host].moe
            prologue = getattr(moe.experts, "decode_prologue", None)  # what the host layer's sync brings over
            if prologue is not None and moe.routing_hook is None:  # (a hook may replace the routing: eager then)
                self.prologues[j] = prologue(pending.x, pending.indices)
            return pending
        return model.lm_head(model.norm(self.x[-1])).float()[0, 0]

    @torch.inference_mode()
    def _capture(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside capture: kernels compiled, scratch allocated
            for _ in range(2):
                for j in range(len(self.segments)):
                    self._segment(j)
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for j in range(len(self.segments)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._segment(j)
            self.graphs.append(graph)
            self.outputs.append(out)
        for block in self.model.moe_blocks():  # the warm-up's expert lookups did not happen for real
            getattr(block.experts, "after_capture", lambda: None)()

    @torch.inference_mode()
    def step(self, token: int, position: int) -> torch.Tensor:
        """Feed ``token`` at ``position``; return float32 logits [V]. The caller owns ``kv.length``."""
        model, c = self.model, self.model.config
        # The table is on the GPU, or pinned in host memory (placement.py): either way an asynchronous copy of one row.
        self.x[0].view(-1).copy_(model.embed_tokens.weight[token], non_blocking=True)
        self.pos.fill_(position)
        torch.le(self.positions, self.pos, out=self.mask[0])
        if c.sliding_window is not None:
            self.mask[0] &= (self.pos - self.positions) < c.sliding_window
        graphed_experts = EXPERT_GRAPHS.set(self.expert_pool)
        try:
            for j, (_, host) in enumerate(self.segments):
                if self.use_graphs:
                    self.graphs[j].replay()
                    out = self.outputs[j]
                else:
                    out = self._segment(j)
                if host is not None:
                    moe = model.layers[host].moe
                    if j in self.prologues and moe.routing_hook is None:
                        moe.experts.use_prologue(self.prologues[j])
                    model.layers[host].finish(out, out=self.x[host + 1])  # the routed experts, eager
        finally:
            EXPERT_GRAPHS.reset(graphed_experts)
        return out.clone() if self.use_graphs else out
