"""The MoE transformer of every supported family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), written for control
over streams, caches and kernels. Family differences are ModelConfig fields, each with one branch here:
q/k norms and q/k/v clipping (Attention), attention biases (nn.Linear bias), router renormalization (Router),
the gated shared expert (MoEBlock), dense MLP layers (DecoderLayer).

Dimension legend: B batch, S new tokens, P cached + new positions, T = B*S tokens, D hidden,
H query heads, Hk key/value heads, Dh head dim, E experts, K experts per token, I expert ffn, V vocab.

The model never knows where experts live: the MoE block computes ``weights, indices = router(x)`` and
calls its ``experts`` provider. Every projection is an ``nn.Linear`` that quantization may swap for a
module with the same ``forward``; nothing here changes when it does.
"""

from __future__ import annotations

from typing import Callable, Collection, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ModelConfig
from .kv_cache import KVCache


SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# Fused replacements for the small operations of a step, installed per module on a GPU (engine.py,
# kernels/fused.py). Each takes the PyTorch code's inputs and returns its result, or None where it does not
# apply (then the PyTorch code below runs).
FusedNorm = Callable[[torch.Tensor, torch.Tensor, float], "torch.Tensor | None"]  # (x, weight, eps)
FusedRope = Callable[..., "tuple[torch.Tensor, torch.Tensor] | None"]  # (q, k, cos, sin) -> (q, k)
FusedRoute = Callable[[torch.Tensor, int, bool], "tuple[torch.Tensor, torch.Tensor] | None"]  # (logits, k, normalize)
FusedQKV = Callable[[torch.Tensor], torch.Tensor]  # x [.., D] -> [.., q + 2 kv]: the three projections in one matmul


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused: FusedNorm | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            y = self.fused(x, self.weight, self.eps)
            if y is not None:
                return y
        # Normalize in float32 like the reference, then scale in the activation dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for ``positions`` [B, S] -> two [B, 1, S, Dh] tensors (half-rotation layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, S, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, Dh]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_mask(start: int, new: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [S, P] mask (True = attend) for queries at start..start+S over keys 0..start+S.

    ``None`` when plain causal attention over everything cached is exact (saves building a mask at decode).
    """
    total = start + new
    if window is None or window >= total:
        if new == 1:
            return None
    q = torch.arange(start, total, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    mask = k <= q
    if window is not None:
        mask &= (q - k) < window
    return mask


# (q [1, H, 1, Dh], keys/values [1, Hk, M, Dh], pos [1], window) -> [1, H, 1, Dh], or None where it does not apply:
# a faster attention for the static decode step, installed by graphs.GraphedDecode (kernels/attention.py).
DecodeAttention = Callable[..., "torch.Tensor | None"]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, q, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, kv, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, kv, bias=c.qkv_bias)
        self.o_proj = nn.Linear(q, c.hidden_size, bias=c.o_bias)
        self.qk_norm, self.clip_qkv, self.window = c.qk_norm, c.clip_qkv, c.sliding_window
        self.decode_attention: DecodeAttention | None = None  # static decode steps only; None: SDPA under the mask
        self.fused_rope: FusedRope | None = None
        self.fused_qkv: FusedQKV | None = None
        if c.qk_norm is not None:  # Qwen3: each head over Dh; OLMoE: the whole projection, before the head split
            per_head = c.qk_norm == "head"
            self.q_norm = RMSNorm(c.head_dim if per_head else q, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim if per_head else kv, c.rms_norm_eps)

    def forward(self, x, cos, sin, kv: KVCache, layer: int, start: int | torch.Tensor, mask) -> torch.Tensor:
        """``start``: first position (an int), or a one-element device tensor for a static-shape decode step
        (CUDA-graph capturable: the key is written at that position and attention spans the whole cache
        under ``mask``)."""
        B, S, _ = x.shape
        if self.fused_qkv is not None:
            kv_size = self.num_kv_heads * self.head_dim
            q, k, v = self.fused_qkv(x).split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, S, H*Dh], [B, S, Hk*Dh], [B, S, Hk*Dh]
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(B, S, self.num_heads, self.head_dim)  # [B, S, H, Dh]
        k = k.view(B, S, self.num_kv_heads, self.head_dim)  # [B, S, Hk, Dh]
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, S, Dh], [B, Hk, S, Dh]
        v = v.view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hk, S, Dh]
        rotated = None if self.fused_rope is None else self.fused_rope(q, k, cos, sin)
        q, k = rotated if rotated is not None else (apply_rope(q, cos, sin), apply_rope(k, cos, sin))
        if isinstance(start, torch.Tensor):
            keys, values = kv.update_at(layer, start, k, v)  # [B, Hk, M, Dh]
            if self.decode_attention is not None:  # visits keys <= start only (kernels/attention.py)
                out = self.decode_attention(q, keys, values, start, self.window)  # [B, H, 1, Dh] or None
                if out is not None:
                    return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))
        else:
            keys, values = kv.update(layer, start, k, v)  # [B, Hk, P, Dh]
        # cuDNN's attention builds a plan per new key length: ~1.3 ms of host time per call at decode.
        with sdpa_kernel(SDPA_BACKENDS):
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, enable_gqa=self.num_heads != self.num_kv_heads
            )  # [B, H, S, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class Expert(nn.Module):
    """One SwiGLU MLP: down(silu(gate(x)) * up(x)); a routed expert, a shared expert or a dense layer's MLP.
    Mixtral's w1 = gate, w3 = up, w2 = down."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_with_head(self, x: torch.Tensor, units: int, head: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The expert's output when its first ``units`` hidden units, silu(gate(x)) * up(x) for rows [0, units), come from
        elsewhere: ``head()`` -> [T, units], called once the rest is enqueued (the GPU computes its share while the caller
        waits for the CPU's). Only rows [units, I) of gate and up are read here. A split expert (offload/hybrid.py)."""
        tail = F.silu(F.linear(x, self.gate_proj.weight[units:])) * F.linear(x, self.up_proj.weight[units:])
        return self.down_proj(torch.cat([head().to(tail.dtype), tail], dim=-1))


class Experts(Protocol):
    """Where a layer's experts live (resident, offloaded, ...): ``(x [T, D], indices [T, K], weights [T, K]) -> [T, D]``."""

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


def combine_experts(
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, expert: Callable[[int], nn.Module],
    routed: list[int] | None = None, last: Collection[int] = (),
) -> torch.Tensor:
    """Weighted sum of the chosen experts' outputs: x [T, D], indices/weights [T, K] -> [T, D].

    Every provider computes through this one function, in ascending expert order, so where an expert
    lives never changes the arithmetic: offloaded and resident outputs are bit-identical.
    ``expert(e)`` returns a module ready to run on x's device (it may wait for a copy to land);
    ``routed`` is ``indices`` already on the host (flattened), which saves the host sync.
    ``last`` (decode only): experts whose outputs arrive late, added after the others so the device
    is not kept waiting for them; this reorders the float sum (the hybrid CPU path's documented
    tolerance), so exact providers leave it empty.
    """
    if routed is None:
        routed = indices.flatten().tolist()  # the one host sync per MoE layer: routing must reach the host
    out = torch.zeros_like(x)
    if x.shape[0] == 1:  # decode: a token's k-th weight is a view, no gather/scatter kernels
        for k, e in sorted(enumerate(routed), key=lambda ke: (ke[1] in last, ke[1])):
            out.addcmul_(expert(e)(x), weights[:, k : k + 1])
        return out
    # Prefill: each expert's rows at their (token, rank) pairs' positions, then one float32 sum per token in rank
    # order. Pairs are grouped by expert on the host from ``routed``: one small copy to the device per layer, no host
    # sync per expert.
    k = indices.shape[1]
    flat = np.asarray(routed, dtype=np.int64)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat)
    pairs = torch.from_numpy(order).to(x.device)  # positions t * K + k, grouped by expert
    tokens = pairs // k
    y = x.new_empty((flat.size, x.shape[1]))
    start = 0
    for e in sorted(set(routed)):
        rows = slice(start, start + int(counts[e]))
        start = rows.stop
        y.index_copy_(0, pairs[rows], prefill_rows(expert(e), x[tokens[rows]]).to(y.dtype))
    return sum_ranks(y, weights)


def prefill_rows(expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An expert over a prefill's rows: its ``prefill`` method where it has one (the quantized expert's kernel,
    whose rows do not depend on how many there are), else its forward."""
    run = getattr(expert, "prefill", None)
    return run(x) if run is not None else expert(x)


# The prefill's per-token sum in one launch on a GPU (kernels/fused.weighted_sum), installed by the engine with the
# other fused steps (engine.install_fused_kernels); it returns None where it does not apply. Unset: PyTorch's code.
FUSED_RANK_SUM: Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"] | None = None


def sum_ranks(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y [T*K, D] (row t*K + k: token t's k-th expert's output), weights [T, K] (or [K]: T = 1) -> [T, D] in y's
    dtype: sum_k weights[t, k] * y[t*K + k] in float32, k = 0, 1, ... (``FUSED_RANK_SUM`` on a GPU)."""
    if y.is_cuda and FUSED_RANK_SUM is not None:
        out = FUSED_RANK_SUM(y, weights)
        if out is not None:
            return out
    return sum_ranks_reference(y, weights)


def sum_ranks_reference(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:func:`sum_ranks` in PyTorch operations."""
    w = weights.reshape(-1, weights.shape[-1])
    t, k = w.shape
    yk = y.reshape(t, k, -1)
    acc = torch.zeros((t, y.shape[1]), dtype=torch.float32, device=y.device)
    for j in range(k):
        acc = acc + yk[:, j].float() * w[:, j : j + 1].float()
    return acc.to(y.dtype)


class ResidentExperts(nn.Module):
    """All experts of a layer held as ordinary modules on the model's device."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.experts = nn.ModuleList(Expert(hidden_size, intermediate_size) for _ in range(num_experts))

    def forward(self, x, indices, weights):
        return combine_experts(x, indices, weights, self.experts.__getitem__)


class Router(nn.Module):
    """Top-k softmax router: probabilities in float32, top-k, optionally renormalized to sum to 1."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.top_k, self.normalize = config.top_k, config.norm_topk_prob
        self.fused: FusedRoute | None = None  # softmax, top-k and renormalization in one step

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)  # [T, E]
        if self.fused is not None:
            routed = self.fused(logits, self.top_k, self.normalize)
            if routed is not None:
                return routed
        probs = F.softmax(logits.float(), dim=-1)  # [T, E]
        weights, indices = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, indices


# (x [T, D], weights [T, K], indices [T, K]) -> (weights [T, K'], indices [T, K']): see MoEBlock.routing_hook.
RoutingHook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class MoEBlock(nn.Module):
    """Routed experts, computed by a provider (``experts``), plus an optional resident shared expert.

    The shared expert (Qwen2-MoE) runs on every token, scaled by ``sigmoid(shared_expert_gate(x))``; it is
    part of the model, not of the provider, so it stays resident wherever the routed experts live.
    ``routing_hook`` (None by default) sees the router's choice just before the experts and may replace it
    (routing.py: record a trace, or replay one); it runs eagerly, also in a graphed decode step.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.router = Router(config)
        self.experts: Experts = ResidentExperts(config.num_experts, config.hidden_size, config.intermediate_size)
        self.shared_expert: Expert | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = Expert(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.routing_hook: RoutingHook | None = None

    def set_experts(self, experts: Experts) -> None:
        """Swap the expert provider (a module, or any callable with the Experts signature)."""
        self._modules.pop("experts", None)
        if isinstance(experts, nn.Module):
            self.experts = experts
        else:
            object.__setattr__(self, "experts", experts)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [T, D] -> router weights [T, K], indices [T, K], gated shared-expert output [T, D] (or None).
        Everything here is resident and needs no host sync."""
        weights, indices = self.router(x)
        if self.shared_expert is None:
            return weights, indices, None
        return weights, indices, torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def combine(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                shared: torch.Tensor | None) -> torch.Tensor:
        """The routed experts' weighted sum [T, D], plus the shared expert's output (transformers' order)."""
        if self.routing_hook is not None:
            weights, indices = self.routing_hook(x, weights, indices)
        y = self.experts(x, indices, weights)
        return y if shared is None else y + shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        flat = x.reshape(B * S, D)  # [T, D]
        return self.combine(flat, *self.route(flat)).reshape(B, S, D)


class Pending(NamedTuple):
    """A decoder layer's output short of its routed experts: ``residual + combine(x, weights, indices, shared)``."""

    residual: torch.Tensor  # [B, S, D] after attention; a dense layer's finished output
    x: torch.Tensor | None = None  # [T, D] the MoE block's input; None for a dense layer (nothing left to do)
    weights: torch.Tensor | None = None  # [T, K]
    indices: torch.Tensor | None = None  # [T, K]
    shared: torch.Tensor | None = None  # [T, D] gated shared-expert output (Qwen2-MoE)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # A MoE layer has ``moe``; a dense one (Qwen's mlp_only_layers / decoder_sparse_step) has ``mlp``.
        moe = config.is_moe_layer(index)
        self.moe: MoEBlock | None = MoEBlock(config) if moe else None
        self.mlp: Expert | None = None if moe else Expert(config.hidden_size, config.dense_intermediate_size)

    def forward(self, x, cos, sin, kv: KVCache, start: int, mask) -> torch.Tensor:
        return self.finish(self.prepare(x, cos, sin, kv, start, mask))

    def attend(self, x, cos, sin, kv: KVCache, start: int | torch.Tensor, mask) -> torch.Tensor:
        """The residual stream after this layer's attention (the part before the MoE block)."""
        return x + self.self_attn(self.input_layernorm(x), cos, sin, kv, self.index, start, mask)

    def prepare(self, x, cos, sin, kv: KVCache, start: int | torch.Tensor, mask) -> Pending:
        """Everything before the routed experts: attention, norms, router, shared expert (a dense layer: all).

        No host sync happens here, so a static-shape decode step can capture it in a CUDA graph (graphs.py).
        """
        h = self.attend(x, cos, sin, kv, start, mask)
        normed = self.post_attention_layernorm(h)
        if self.moe is None:
            return Pending(h + self.mlp(normed))
        flat = normed.reshape(-1, normed.shape[-1])  # [T, D]
        return Pending(h, flat, *self.moe.route(flat))

    def finish(self, p: Pending, out: torch.Tensor | None = None) -> torch.Tensor:
        """Add the routed experts (eager: which ones run is decided on the host). Writes into ``out`` if given."""
        if p.x is None:
            return p.residual if out is None else out.copy_(p.residual)
        y = self.moe.combine(p.x, p.weights, p.indices, p.shared)  # [T, D]
        return torch.add(p.residual, y.view_as(p.residual), out=out)


class MoeTransformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Called with the number of new tokens before a forward enqueues anything: whoever provides the experts may
        # start work that does not depend on this forward (offloading starts a prefill's first expert copies).
        self.before_forward: Callable[[int], None] | None = None

    def moe_blocks(self) -> list[MoEBlock]:
        """The MoE blocks in layer order (dense layers have none); offloading numbers them 0, 1, ..."""
        return [layer.moe for layer in self.layers if layer.moe is not None]

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        """Where the model computes (the embedding table may sit in host memory: ``embed``)."""
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> [B, S, D] on the tokens' device. The table may live in host memory (a GPU short of memory:
        placement.py): then the rows are gathered there and uploaded, a copy, so the result is the same bits."""
        weight = self.embed_tokens.weight
        if weight.device == tokens.device:
            return self.embed_tokens(tokens)
        return nn.functional.embedding(tokens.cpu(), weight).to(tokens.device)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVCache, start: int, last_only: bool = False) -> torch.Tensor:
        """tokens [B, S] at positions start..start+S-1 -> float32 logits [B, S, V] (or [B, 1, V] with last_only).

        Writes the new keys/values into ``kv``; the caller owns ``kv.length``.
        """
        B, S = tokens.shape
        c = self.config
        if self.before_forward is not None:
            self.before_forward(B * S)
        positions = torch.arange(start, start + S, device=tokens.device).expand(B, S)
        x = self.embed(tokens)  # [B, S, D]
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
        mask = attention_mask(start, S, c.sliding_window, tokens.device)
        for layer in self.layers:
            x = layer(x, cos, sin, kv, start, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()

    def new_kv_cache(self, max_len: int, batch: int = 1) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, self.dtype, self.device)
