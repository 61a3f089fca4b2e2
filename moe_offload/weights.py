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
from torch import nn

from . import kernels
from .config import ModelConfig
from .errors import MoeOffloadError
from .loading import EXPERT_KEY, CheckpointFiles, iter_tensors
from .model import Expert
from .flat import FlatLayout
from .quant.hqq import QuantizedTensor, QuantSpec, quantize, tensor_layout
from .quant.linear import QuantLinear
from .quant.presets import QuantPreset

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


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
    """Quantize each layer's attention projections, experts (and lm_head if the preset says so) on
    ``device`` (the GPU when there is one); everything else becomes ``dtype``. Outputs live on the CPU."""
    for layer in layers:
        out = LayerWeights(layer.index)
        for name, tensor in layer.params.items():
            module = name.removesuffix(".weight")
            if ".self_attn." in name:
                out.quantized[module] = _quantize_to_cpu(name, tensor, preset.attention, device)
            elif name == "lm_head.weight" and preset.lm_head is not None:
                out.quantized[module] = _quantize_to_cpu(name, tensor, preset.lm_head, device)
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


class QuantExpert(Expert):
    """A quantized expert; on CUDA with 16-bit activations the fused kernels run it in two launches
    (gate+up+SiLU, then down) instead of five.

    Inside a graphed decode step (``EXPERT_GRAPHS``) a batch-1 call replays a CUDA graph captured for
    this module and this input buffer: the decode loop's inputs are static buffers and an offloaded
    expert's weights sit at its slot's fixed address, so replay reads whatever expert the slot holds.
    The first call per input runs eagerly (compiling kernels, allocating scratch); the second captures.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and kernels.available():
            pool = EXPERT_GRAPHS.get()
            if x.shape[0] == 1 and pool is not None:
                return self._replay(x, pool)
            return self._fused(x)
        return super().forward(x)

    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.expert_forward(x, self.gate_proj.qt, self.up_proj.qt, self.down_proj.qt)

    def _replay(self, x: torch.Tensor, pool) -> torch.Tensor:
        graphs = self.__dict__.setdefault("_graphs", {})  # input data_ptr -> None (warmed) or (graph, output)
        key = x.data_ptr()
        if key not in graphs:
            graphs[key] = None
            return self._fused(x)
        if graphs[key] is None:
            graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                graph.capture_begin(pool=pool)
                out = self._fused(x)
                graph.capture_end()
            torch.cuda.current_stream(x.device).wait_stream(side)
            graphs[key] = (graph, out)
        graph, out = graphs[key]
        graph.replay()
        return out
def build_expert(flat: dict[str, torch.Tensor], config: ModelConfig, spec: QuantSpec | None) -> Expert:
    """An Expert module whose weights are exactly the given tensors (views stay views: no copies)."""
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
