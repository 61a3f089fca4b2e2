"""Synthetic models: real architectures' shapes with random weights, built directly in quantized form on
the device, so full-size speed is measurable without downloading anything.

They come out as the same LayerWeights stream as a checkpoint, so everything downstream (placement,
expert store, cache) is exercised exactly as with real weights. Embeddings are drawn at std 1.0: with
transformers' std 0.02 the hidden states are degenerate and every token routes alike, which flatters
any cache. Routing on random weights is close to uniform over the experts.
"""

from __future__ import annotations

from typing import Iterator

import torch

from .config import ModelConfig
from .errors import MoeOffloadError
from .quant.hqq import QuantizedTensor, QuantSpec, meta_block, tensor_layout
from .quant.presets import QuantPreset
from .weights import LayerWeights, expert_shapes

SHAPES: dict[str, dict] = {
    "mixtral-8x7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                         num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, rope_theta=1e6),
    "mixtral-8x22b": dict(vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_layers=56,
                          num_heads=48, num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, rope_theta=1e6),
    "tiny": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, num_experts=4, top_k=2, rope_theta=1e6),
}


def synthetic_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise MoeOffloadError(f"--synthetic {name!r} is unknown; choose one of {', '.join(SHAPES)}")
    return ModelConfig(model_type="mixtral", max_position_embeddings=32768, eos_token_ids=(2,), **SHAPES[name])


def random_quantized(shape: tuple[int, int], spec: QuantSpec, generator: torch.Generator,
                     device: torch.device) -> QuantizedTensor:
    """Random codes and metadata scaled so that W has std ~ 1/sqrt(K) (activations keep their size)."""
    n, k = shape
    tensors = {}
    for name, (tshape, dtype) in tensor_layout(shape, spec).items():
        if name == "qweight":  # every bit pattern is a valid code
            tensors[name] = torch.randint(-2**31, 2**31 - 1, tshape, dtype=torch.int32, device=device,
                                          generator=generator)
    levels = 2**spec.bits - 1
    scale = (torch.rand((n, k // spec.group_size), device=device, generator=generator) * 0.5 + 0.75) \
        * (2.0 * 3**0.5 / levels / k**0.5)  # uniform codes have std levels/sqrt(12)
    zero = levels / 2 + (torch.rand(scale.shape, device=device, generator=generator) - 0.5)
    for name, value in (("scale", scale), ("zero", zero)):
        if not spec.quant_meta:
            tensors[name] = value.half()
            continue
        block = meta_block(value.shape[1])
        v = value.view(n, -1, block)
        lo, hi = v.amin(-1), v.amax(-1)
        step = ((hi - lo) / 255).clamp_min(1e-6)
        tensors[f"{name}_q"] = ((v - lo[..., None]) / step[..., None]).round().clamp(0, 255).to(torch.uint8).view(n, -1)
        tensors[f"{name}_step"], tensors[f"{name}_offset"] = step.half(), lo.half()
    return QuantizedTensor.from_tensors(tensors, shape, spec)


def synthetic_layers(config: ModelConfig, preset: QuantPreset | None, device: torch.device,
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Iterator[LayerWeights]:
    """A random model as LayerWeights (on ``device``), embeddings first, then layer by layer."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    c = config

    def dense(n: int, k: int, std: float) -> torch.Tensor:
        return (torch.randn((n, k), device=device, generator=g) * std).to(dtype)

    def linear(out: LayerWeights, name: str, n: int, k: int, spec: QuantSpec | None) -> None:
        if spec is None:
            out.params[name] = dense(n, k, k**-0.5)
        else:
            out.quantized[name.removesuffix(".weight")] = random_quantized((n, k), spec, g, device)

    head = LayerWeights(None)
    head.params["embed_tokens.weight"] = dense(c.vocab_size, c.hidden_size, 1.0)
    head.params["norm.weight"] = torch.ones(c.hidden_size, device=device, dtype=dtype)
    if not c.tie_word_embeddings:
        linear(head, "lm_head.weight", c.vocab_size, c.hidden_size, preset.lm_head if preset else None)
    yield head
    attn = preset.attention if preset else None
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    for i in range(c.num_layers):
        layer = LayerWeights(i)
        p = f"layers.{i}."
        for name, n, k in (("q_proj", q, c.hidden_size), ("k_proj", kv, c.hidden_size),
                           ("v_proj", kv, c.hidden_size), ("o_proj", c.hidden_size, q)):
            linear(layer, f"{p}self_attn.{name}.weight", n, k, attn)
        layer.params[f"{p}input_layernorm.weight"] = torch.ones(c.hidden_size, device=device, dtype=dtype)
        layer.params[f"{p}post_attention_layernorm.weight"] = torch.ones(c.hidden_size, device=device, dtype=dtype)
        layer.params[f"{p}moe.router.gate.weight"] = dense(c.num_experts, c.hidden_size, c.hidden_size**-0.5)
        for e in range(c.num_experts):
            flat: dict[str, torch.Tensor] = {}
            for proj, (n, k) in expert_shapes(c).items():
                if preset is None:
                    flat[f"{proj}.weight"] = dense(n, k, k**-0.5)
                else:
                    qt = random_quantized((n, k), preset.experts, g, device)
                    flat.update({f"{proj}.{name}": t for name, t in qt.tensors().items()})
            layer.experts[e] = flat
        yield layer
