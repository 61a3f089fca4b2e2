"""Batch-1 decode with each layer's dense part replayed from a CUDA graph.

Eager decode issues ~60 small kernels per layer from Python; at batch 1 the host, not the GPU, sets the
pace. Here each layer's attention, norms and router run as one captured graph over static buffers (the
position lives in a device tensor, attention spans the whole KV cache under a mask). The experts stay
eager: which ones run, and which copies they wait for, is decided on the host from the router's output.
Per layer and token: one graph replay, the routing sync, the experts, one add. Quantized experts replay
graphs of their own too (see weights.QuantExpert, grouped.SlotKernel), keyed by their static input buffer.

When every MoE layer picks its experts on the device (resident quantized stacks, grouped.py), nothing needs
the host between layers and the whole step, lm_head included, is one graph: one replay per token.
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
        weight = model.embed_tokens.weight
        self.model, self.kv, self.device, self.dtype = model, kv, weight.device, weight.dtype
        M, D = kv.max_len, c.hidden_size
        self.pos = torch.full((1,), M - 1, dtype=torch.long, device=self.device)  # capture writes the last slot
        self.positions = torch.arange(M, device=self.device)
        self.mask = torch.ones(1, M, dtype=torch.bool, device=self.device)  # [S=1, M]
        # RoPE tables of the step's position: computed once per step (in layer 0), read by every layer.
        self.cos = torch.zeros(1, 1, 1, c.head_dim, dtype=self.dtype, device=self.device)
        self.sin = torch.zeros_like(self.cos)
        self.x = [torch.zeros(1, 1, D, dtype=self.dtype, device=self.device) for _ in range(c.num_layers + 1)]
        self.outputs: list[Pending] = []
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.use_graphs = use_graphs and self.device.type == "cuda"
        if self.device.type == "cuda" and kernels.available():  # attention over keys <= pos, not the whole cache
            from .kernels.attention import decode_attention_if_supported

            for layer in model.layers:
                layer.self_attn.decode_attention = decode_attention_if_supported
        self.expert_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # Every MoE layer picks its experts on the device (resident stacks): the whole step is one graph. A routing
        # hook (routing.py: trace recording or replay) runs Python between router and experts: per-layer graphs.
        probe = self.x[0].view(1, D)
        self.whole = self.use_graphs and all(
            block.routing_hook is None and getattr(block.experts, "decode_on_device", lambda _: False)(probe)
            for block in model.moe_blocks())
        self.logits: torch.Tensor | None = None
        if self.whole:
            self._capture_whole()
        elif self.use_graphs:
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

    def _capture(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up outside capture: kernels compiled, scratch allocated
            for i in range(len(self.model.layers)):
                self._dense(i)
                self._dense(i)
        torch.cuda.current_stream(self.device).wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        for i in range(len(self.model.layers)):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self._dense(i)
            self.graphs.append(graph)
            self.outputs.append(out)

    def _all_layers(self) -> torch.Tensor:
        model = self.model
        for i, layer in enumerate(model.layers):
            layer.finish(self._dense(i), out=self.x[i + 1])
        return model.lm_head(model.norm(self.x[-1])).float()[0, 0]

    @torch.inference_mode()
    def _capture_whole(self) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: kernels compiled, split-K scratch allocated
            self._all_layers()
            self._all_layers()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._all_layers()
        self.graphs.append(graph)

    @torch.inference_mode()
    def step(self, token: int, position: int) -> torch.Tensor:
        """Feed ``token`` at ``position``; return float32 logits [V]. The caller owns ``kv.length``."""
        model, c = self.model, self.model.config
        self.x[0].view(-1).copy_(model.embed_tokens.weight[token])
        self.pos.fill_(position)
        torch.le(self.positions, self.pos, out=self.mask[0])
        if c.sliding_window is not None:
            self.mask[0] &= (self.pos - self.positions) < c.sliding_window
        if self.whole:
            self.graphs[0].replay()
            return self.logits.clone()
        graphed_experts = EXPERT_GRAPHS.set(self.expert_pool)
        try:
            for i, layer in enumerate(model.layers):
                if self.use_graphs:
                    self.graphs[i].replay()
                    pending = self.outputs[i]
                else:
                    pending = self._dense(i)
                layer.finish(pending, out=self.x[i + 1])  # the routed experts, eager
        finally:
            EXPERT_GRAPHS.reset(graphed_experts)
        return model.lm_head(model.norm(self.x[-1])).float()[0, 0]
