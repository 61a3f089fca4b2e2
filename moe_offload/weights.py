"""Weights in transit, one decoder layer at a time: from a checkpoint, through quantization, to a model
or to disk. Streaming by layer keeps peak memory at about one layer, not the model.

An expert travels as one flat dict of named tensors (``gate_proj.weight`` or ``gate_proj.qweight``,
``gate_proj.scale``, ...): the unit the expert store packs into one buffer.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig
from .errors import MoeOffloadError
from .loading import EXPERT_KEY, CheckpointFiles, iter_tensors
from .model import Expert
from .flat import ALIGN, FlatLayout
from .quant.hqq import QuantizedTensor, QuantSpec, quantize, tensor_layout
from .quant.linear import QuantLinear, reference_matmul
from .quant.presets import QuantPreset

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# Weights quantized with the preset's attention spec: the attention projections and the resident MLPs (shared
# expert, dense layers). Routers, the shared-expert gate, norms, biases and embeddings stay 16-bit.
_ATTENTION_SPEC = re.compile(r"\.(self_attn\.[qkvo]_proj|moe\.shared_expert\.\w+_proj|mlp\.\w+_proj)\.weight$")


@dataclass
class LayerWeights:
    """One decoder layer's weights (index None: embeddings, final norm, lm_head)."""

    index: int | None
    params: dict[str, torch.Tensor] = field(default_factory=dict)  # canonical name -> 16/32-bit tensor
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)  # module path -> quantized weight
    experts: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # expert -> flat tensors


def expert_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    d, i = config.hidden_size, config.intermediate_size
    return {"gate_proj": (i, d), "up_proj": (i, d), "down_proj": (d, i)}


def quant_spec(name: str, preset: QuantPreset | None) -> QuantSpec | None:
    """The spec a non-expert weight is quantized with under ``preset``; None: it stays 16-bit."""
    if preset is None:
        return None
    if _ATTENTION_SPEC.search(name):
        return preset.attention
    return preset.lm_head if name == "lm_head.weight" else None


def non_expert_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model except the routed experts, by canonical name (the resident part)."""
    c = config
    d, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (c.vocab_size, d), "norm.weight": (d,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)

    def mlp(prefix: str, i: int) -> None:
        shapes.update({f"{prefix}.gate_proj.weight": (i, d), f"{prefix}.up_proj.weight": (i, d),
                       f"{prefix}.down_proj.weight": (d, i)})

    for layer in range(c.num_layers):
        p = f"layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
        for name, n, k in (("q_proj", q, d), ("k_proj", kv, d), ("v_proj", kv, d), ("o_proj", d, q)):
            shapes[f"{p}self_attn.{name}.weight"] = (n, k)
            if c.qkv_bias if name != "o_proj" else c.o_bias:
                shapes[f"{p}self_attn.{name}.bias"] = (n,)
        if c.qk_norm is not None:
            per_head = c.qk_norm == "head"
            shapes[p + "self_attn.q_norm.weight"] = (c.head_dim if per_head else q,)
            shapes[p + "self_attn.k_norm.weight"] = (c.head_dim if per_head else kv,)
        if not c.is_moe_layer(layer):
            mlp(p + "mlp", c.dense_intermediate_size)
            continue
        shapes[p + "moe.router.gate.weight"] = (c.num_experts, d)
        if c.shared_expert_intermediate_size:
            mlp(p + "moe.shared_expert", c.shared_expert_intermediate_size)
            shapes[p + "moe.shared_expert_gate.weight"] = (1, d)
    return shapes


def non_expert_bytes(config: ModelConfig, preset: QuantPreset | None, dtype: torch.dtype) -> int:
    """Bytes of everything but the routed experts, as it sits on the device (quantized where the preset says)."""
    total = 0
    for name, shape in non_expert_shapes(config).items():
        spec = quant_spec(name, preset)
        if spec is None:
            total += torch.Size(shape).numel() * dtype.itemsize
        else:
            total += sum(torch.Size(s).numel() * t.itemsize for s, t in tensor_layout(shape, spec).values())
    return total


def expert_layout(config: ModelConfig, preset: QuantPreset | None, dtype: torch.dtype) -> FlatLayout:
    """The byte layout of one expert's flat buffer (the same for every expert of a model)."""
    fields = {}
    for proj, shape in expert_shapes(config).items():
        if preset is None:
            fields[f"{proj}.weight"] = torch.empty(shape, dtype=dtype, device="meta")
        else:
            for name, (tshape, tdtype) in tensor_layout(shape, preset.experts).items():
                fields[f"{proj}.{name}"] = torch.empty(tshape, dtype=tdtype, device="meta")
    return FlatLayout.of(fields)


def iter_layers(files: CheckpointFiles, on_read: Callable[[], None] | None = None) -> Iterator[LayerWeights]:
    """A Hugging Face checkpoint as LayerWeights, non-layer tensors first, then layer 0, 1, ..."""
    groups: dict[int | None, dict[str, object]] = {}
    for name, shard in files.weight_map.items():
        m = _LAYER.match(name)
        groups.setdefault(int(m.group(1)) if m else None, {})[name] = shard
    for index in sorted(groups, key=lambda i: -1 if i is None else i):
        subset = CheckpointFiles(files.directory, {n: files.weight_map[n] for n in groups[index]})
        layer = LayerWeights(index)
        for name, tensor in iter_tensors(subset, on_read):
            m = EXPERT_KEY.match(name)
            if m:
                layer.experts.setdefault(int(m.group(2)), {})[f"{m.group(3)}.weight"] = tensor
            else:
                layer.params[name] = tensor
        yield layer


def _quantize_to_cpu(name: str, weight: torch.Tensor, spec: QuantSpec, device: torch.device) -> QuantizedTensor:
    try:
        return quantize(weight.to(device), spec).to("cpu")
    except MoeOffloadError as e:  # name the tensor: "group_size=64 must divide K=96" alone is not enough
        raise MoeOffloadError(f"{name}: {e}; pick bits/group sizes that fit (--attn-group, --expert-group)") from None


def quantize_layers(layers: Iterator[LayerWeights], preset: QuantPreset, device: torch.device,
                    dtype: torch.dtype = torch.bfloat16) -> Iterator[LayerWeights]:
    """Quantize each layer's attention projections, resident MLPs (see ``quant_spec``), experts (and lm_head if
    the preset says so) on ``device`` (the GPU when there is one); everything else becomes ``dtype``. Outputs
    live on the CPU."""
    for layer in layers:
        out = LayerWeights(layer.index)
        for name, tensor in layer.params.items():
            spec = quant_spec(name, preset)
            if spec is not None:
                out.quantized[name.removesuffix(".weight")] = _quantize_to_cpu(name, tensor, spec, device)
            else:
                out.params[name] = tensor.to(dtype)
        for e, tensors in layer.experts.items():
            flat: dict[str, torch.Tensor] = {}
            for proj in PROJECTIONS:
                name = f"layers.{layer.index}.experts.{e}.{proj}.weight"
                qt = _quantize_to_cpu(name, tensors[f"{proj}.weight"], preset.experts, device)
                flat.update({f"{proj}.{k}": v for k, v in qt.tensors().items()})
            out.experts[e] = flat
        yield out


# Set by GraphedDecode around a decode step to its expert-graph memory pool: batch-1 expert calls then
# replay per-input CUDA graphs. (One pool: a graph's output is consumed before the next graph replays.)
EXPERT_GRAPHS: ContextVar[object | None] = ContextVar("expert_graphs", default=None)


def on_kernels(x: torch.Tensor) -> bool:
    """Whether the fused CUDA kernels (kernels/) take this input: 16-bit activations on a GPU where Triton runs."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and kernels.available()


class QuantExpert(Expert):
    """A quantized expert; on CUDA with 16-bit activations the fused kernels run it in two launches
    (gate+up+SiLU, then down) instead of five.

    Inside a graphed decode step (``EXPERT_GRAPHS``) a batch-1 call replays a CUDA graph captured for
    this module and this input buffer: the decode loop's inputs are static buffers and an offloaded
    expert's weights sit at its slot's fixed address, so replay reads whatever expert the slot holds.
    The first call per input runs eagerly (compiling kernels, allocating scratch); the second captures.
    """

    # Engine option: the decode GEMVs (a few rows at most) round their inputs to int8 per block of 32; prefill-sized
    # products stay exact (their kernels are not instruction-bound).
    int8_activations = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if on_kernels(x):
            pool = EXPERT_GRAPHS.get()
            if x.shape[0] == 1 and pool is not None:
                return self._replay(x, pool)
            return self._fused(x)
        if self.int8_activations and x.shape[0] == 1:  # a decode step's arithmetic on the CUDA GEMV, elsewhere
            xr = _rounded(x)
            h = F.silu(self.gate_proj(xr)) * self.up_proj(xr)
            return self.down_proj(_rounded(h))
        return super().forward(x)

    def prefill(self, x: torch.Tensor) -> torch.Tensor:
        """A prefill's rows of this expert (``model.prefill_rows``): on CUDA the prefill kernels (kernels/moe_gemm.py),
        whose rows do not depend on how many there are or which experts share the launch, so that a resident stack's
        one launch per layer (StackedExperts) and offloaded experts one by one give the same bits."""
        if self.prefill_on_kernels(x):
            return kernels.expert_rows(x, self.gate_proj.qt, self.up_proj.qt, self.down_proj.qt)
        return self(x)

    def prefill_on_kernels(self, x: torch.Tensor) -> bool:
        """Whether ``prefill`` runs the prefill kernels: a 16-bit CUDA input, weights they take (checked once per
        module; its shapes never change), and the kernels not switched off (moe_gemm.ENABLED, benchmarks' A/B)."""
        if not on_kernels(x):
            return False
        from .kernels import moe_gemm

        fits = self.__dict__.get("_prefill_fits")
        if fits is None:
            fits = self.__dict__["_prefill_fits"] = all(
                moe_gemm.fits(p.qt) for p in (self.gate_proj, self.up_proj, self.down_proj))
        return fits and moe_gemm.ENABLED

    def forward_with_head(self, x: torch.Tensor, units: int, head: Callable[[], torch.Tensor]) -> torch.Tensor:
        gate, up, down = self.gate_proj.qt, self.up_proj.qt, self.down_proj.qt
        n = gate.shape[0]
        int8 = self.int8_activations and x.shape[0] == 1
        if on_kernels(x):
            return self._fused_with_head(x, units, head, int8)
        tail = None
        if units < n:
            xr = _rounded(x) if int8 else x
            tail = F.silu(reference_matmul(xr, gate.rows(units, n), None)) * reference_matmul(xr, up.rows(units, n), None)
        h = head().to(x.dtype)
        h = h if tail is None else torch.cat([h, tail], dim=-1)
        return reference_matmul(_rounded(h) if int8 else h, down, None)

    def _fused_with_head(self, x: torch.Tensor, units: int, head: Callable[[], torch.Tensor], int8: bool) -> torch.Tensor:
        """The fused kernels write the tail's hidden units into a buffer of all of them (the head lands in front), then
        down reads it. Inside a graphed decode step both halves replay CUDA graphs (eager Triton launches cost ~0.1-0.2
        ms of host time each; a split expert has four)."""
        gate, up, down = self.gate_proj.qt, self.up_proj.qt, self.down_proj.qt
        n = gate.shape[0]
        pool = EXPERT_GRAPHS.get() if x.shape[0] == 1 else None
        buffers = self.__dict__.get("_split_buffers")
        if buffers is None or buffers[0].shape != x.shape or buffers[0].dtype != x.dtype:
            buffers = self._split_buffers = (torch.empty_like(x), torch.empty((x.shape[0], n), dtype=x.dtype,
                                                                                 device=x.device))
        inputs, hidden = buffers
        if pool is not None:  # graphs keyed by head size only, not by every layer's input buffer
            inputs.copy_(x)
            x = inputs
        graphs = self.__dict__.setdefault("_graphs", {})

        def tail() -> torch.Tensor:
            return kernels.gate_up_silu(x, gate.rows(units, n), up.rows(units, n), out=hidden[:, units:],
                                        int8_activations=int8)

        def down_all() -> torch.Tensor:
            return kernels.quant_linear(hidden, down, int8_activations=int8)

        if units < n:
            replay_graph(graphs, ("tail", units), tail, x.device, pool) if pool is not None else tail()
        hidden[:, :units].copy_(head())
        return replay_graph(graphs, ("down", hidden.data_ptr()), down_all, x.device, pool) if pool is not None else down_all()

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.expert_forward(x, self.gate_proj.qt, self.up_proj.qt, self.down_proj.qt,
                                      int8_activations=self.int8_activations)

    def _replay(self, x: torch.Tensor, pool) -> torch.Tensor:
        graphs = self.__dict__.setdefault("_graphs", {})
        return replay_graph(graphs, x.data_ptr(), lambda: self._fused(x), x.device, pool)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the int8-activation GEMV sees it (rounded per block of 32), in x's dtype: the CPU stand-in."""
    from .kernels.gemv_int8 import fake_quantize_reference

    return fake_quantize_reference(x).to(x.dtype)


def replay_graph(graphs: dict, key, run: Callable[[], torch.Tensor], device: torch.device, pool) -> torch.Tensor:
    """``run()`` through a CUDA graph cached in ``graphs[key]`` (key: the static buffers ``run`` reads).

    The first call runs eagerly (compiling kernels, allocating scratch), the second captures, later ones
    replay; the returned tensor is the graph's static output, valid until the next replay."""
    if key not in graphs:
        graphs[key] = None
        return run()
    if graphs[key] is None:
        graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            graph.capture_begin(pool=pool)
            out = run()
            graph.capture_end()
        torch.cuda.current_stream(device).wait_stream(side)
        graphs[key] = (graph, out)
    graph, out = graphs[key]
    graph.replay()
    return out


# The projections with one row per hidden unit: a split expert's head is their first rows.
HEAD_PROJECTIONS = ("gate_proj", "up_proj")


def head_bytes_per_unit(layout: FlatLayout) -> int:
    """Bytes of an expert's flat buffer per hidden unit in gate and up (what the CPU reads for one unit of a head)."""
    return sum(f.nbytes // f.shape[0] for f in layout.fields if f.name.split(".", 1)[0] in HEAD_PROJECTIONS)


def head_split_ranges(layout: FlatLayout, head: int) -> list[tuple[int, int]]:
    """Byte ranges of an expert's flat buffer that ``forward_with_head`` reads when the first ``head`` hidden units come
    from elsewhere: gate and up without their first ``head`` rows (every stored tensor has one row per hidden unit,
    row-major), down whole. Adjacent ranges are merged: what a split expert's copy moves."""
    ranges: list[tuple[int, int]] = []
    for f in layout.fields:
        start = f.offset
        if f.name.split(".", 1)[0] in HEAD_PROJECTIONS:
            start += head * (f.nbytes // f.shape[0])
        if start == f.offset + f.nbytes:
            continue  # every row comes from elsewhere
        if ranges and ranges[-1][1] >= start - ALIGN and ranges[-1][1] <= start:  # only alignment padding between
            ranges[-1] = (ranges[-1][0], f.offset + f.nbytes)
        else:
            ranges.append((start, f.offset + f.nbytes))
    return ranges


def build_expert(flat: dict[str, torch.Tensor], config: ModelConfig, spec: QuantSpec | None) -> Expert:
    """An Expert module whose weights are exactly the given tensors (views stay views: no copies).

    A tensor not aligned like a FlatLayout view (e.g. memory-mapped straight from a safetensors file) is
    copied into fresh, aligned memory: CPU matmul kernels choose their path by alignment, and resident experts
    must compute bit-identically to offloaded ones, whose weights are aligned views into a slot.
    """
    flat = {k: v if v.data_ptr() % ALIGN == 0 else v.clone() for k, v in flat.items()}
    with torch.device("meta"):
        expert = (Expert if spec is None else QuantExpert)(config.hidden_size, config.intermediate_size)
    for proj, shape in expert_shapes(config).items():
        if spec is None:
            linear = getattr(expert, proj)
            linear.weight = nn.Parameter(flat[f"{proj}.weight"], requires_grad=False)
        else:
            parts = {k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(proj + ".")}
            setattr(expert, proj, QuantLinear(QuantizedTensor.assemble(parts, shape, spec)))
    return expert
