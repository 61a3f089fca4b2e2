"""Synthetic models: real architectures' shapes with random weights, built directly in quantized form on
the device, so full-size speed is measurable without downloading anything.

They come out as the same LayerWeights stream as a checkpoint, so everything downstream (placement,
expert store, cache) is exercised exactly as with real weights. Embeddings are drawn at std 1.0: with
transformers' std 0.02 the hidden states are degenerate and every token routes alike, which flatters
any cache. Routing on random weights is close to uniform over the experts.
"""

from __future__ import annotations

import contextlib

from typing import Iterator

import torch

from .config import ModelConfig
from .errors import MoeOffloadError
from .quant.hqq import QuantizedTensor, QuantSpec, meta_block, share_byte, tensor_layout
from .quant.presets import QuantPreset
from .weights import LayerWeights, expert_shapes, non_expert_shapes, quant_spec

# Real shapes, from each model's config.json on the Hugging Face Hub.
SHAPES: dict[str, dict] = {
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, num_experts=8, top_k=2,
                         rope_theta=1e6, eos_token_ids=(2,)),
    "mixtral-8x22b": dict(model_type="mixtral", vocab_size=32768, hidden_size=6144, intermediate_size=16384,
                          num_layers=56, num_heads=48, num_kv_heads=8, head_dim=128, num_experts=8, top_k=2,
                          rope_theta=1e6, max_position_embeddings=65536, eos_token_ids=(2,)),
    # Qwen/Qwen3-30B-A3B: head_dim 128 is not hidden/heads (64); per-head q/k norms; top-8 of 128, renormalized.
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=768,
                          num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128, top_k=8,
                          rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960, qk_norm="head",
                          norm_topk_prob=True, eos_token_ids=(151645,)),
    # allenai/OLMoE-1B-7B-0924: q/k norms over the whole projection; top-8 of 64, not renormalized.
    "olmoe-1b-7b": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                        num_layers=16, num_heads=16, num_kv_heads=16, head_dim=128, num_experts=64, top_k=8,
                        rope_theta=1e4, max_position_embeddings=4096, qk_norm="full", norm_topk_prob=False,
                        eos_token_ids=(50279,)),
    # Qwen/Qwen1.5-MoE-A2.7B (qwen2_moe): q/k/v biases, a gated shared expert of width 5632, top-4 of 60.
    "qwen1.5-moe-a2.7b": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=1408,
                              num_layers=24, num_heads=16, num_kv_heads=16, head_dim=128, num_experts=60, top_k=4,
                              rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=8192, qkv_bias=True,
                              shared_expert_intermediate_size=5632, norm_topk_prob=False,
                              eos_token_ids=(151643,)),
    "tiny": dict(model_type="mixtral", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=16, num_experts=4, top_k=2, rope_theta=1e6,
                 max_position_embeddings=32768, eos_token_ids=(2,)),
    # Top-8 of 16 with q/k norms: many misses per layer, for tests of the batched copies.
    "tiny-qwen3": dict(model_type="qwen3_moe", vocab_size=320, hidden_size=64, intermediate_size=64, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=32, num_experts=16, top_k=8, rope_theta=1e6,
                       max_position_embeddings=32768, qk_norm="head", norm_topk_prob=True, eos_token_ids=(2,)),
}


def synthetic_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise MoeOffloadError(f"--synthetic {name!r} is unknown; choose one of {', '.join(SHAPES)}")
    config = ModelConfig(**SHAPES[name])
    config.validate(f"--synthetic {name}")
    return config


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
    top = 2**spec.meta_bits - 1
    for name, value in (("scale", scale), ("zero", zero)):
        if not spec.quant_meta:
            tensors[name] = value.half()
            continue
        block = meta_block(value.shape[1])
        v = value.view(n, -1, block)
        lo, hi = v.amin(-1), v.amax(-1)
        step = ((hi - lo) / top).clamp_min(1e-6)
        tensors[f"{name}_q"] = ((v - lo[..., None]) / step[..., None]).round().clamp(0, top).to(torch.uint8).view(n, -1)
        tensors[f"{name}_step"], tensors[f"{name}_offset"] = step.half(), lo.half()
    if spec.quant_meta and spec.meta_bits == 4:  # one byte per group: scale's code low, zero's high
        tensors["meta_q"] = share_byte(tensors.pop("scale_q"), tensors.pop("zero_q"))
    return QuantizedTensor.from_tensors(tensors, shape, spec)


def synthetic_layers(config: ModelConfig, preset: QuantPreset | None, device: torch.device,
                     dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     experts_to_host: bool = False) -> Iterator[LayerWeights]:
    """A random model as LayerWeights (on ``device``), embeddings first, then layer by layer.

    The non-expert tensors are exactly ``non_expert_shapes(config)``, quantized where ``quant_spec`` says.
    ``experts_to_host``: each expert, once generated, is moved to host memory (offloading: the GPU then never holds
    more than one expert being generated). The values do not depend on it.
    """
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    c = config

    def dense(shape: tuple[int, ...], std: float) -> torch.Tensor:  # drawn in dtype: no float32 transients
        return torch.randn(shape, device=device, generator=g, dtype=dtype).mul_(std)

    def put(out: LayerWeights, name: str, shape: tuple[int, ...]) -> None:
        spec = quant_spec(name, preset)
        if spec is not None:
            out.quantized[name.removesuffix(".weight")] = random_quantized(shape, spec, g, device)
        elif name.endswith("norm.weight"):
            out.params[name] = torch.ones(shape, device=device, dtype=dtype)
        elif name == "embed_tokens.weight":
            out.params[name] = dense(shape, 1.0)
        elif name.endswith(".bias"):
            out.params[name] = dense(shape, 0.02)
        else:  # linear weights, routers included
            out.params[name] = dense(shape, shape[-1] ** -0.5)

    by_layer: dict[int | None, dict[str, tuple[int, ...]]] = {}
    for name, shape in non_expert_shapes(c).items():
        index = int(name.split(".")[1]) if name.startswith("layers.") else None
        by_layer.setdefault(index, {})[name] = shape
    # Experts are generated on a stream of their own: PyTorch's allocator keeps each stream's blocks apart, so the
    # generation's transients leave whole free segments that empty_cache returns, not holes between the resident
    # weights (0.7 GiB of them at Mixtral 4/2, 12 GiB: BENCHMARKS.md, session 13).
    main = torch.cuda.current_stream(device) if device.type == "cuda" else None
    side = torch.cuda.Stream(device) if main is not None else None
    for index in [None, *range(c.num_layers)]:
        layer = LayerWeights(index)
        for name, shape in by_layer[index].items():
            put(layer, name, shape)
        if index is not None and c.is_moe_layer(index):
            if side is not None:
                side.wait_stream(main)  # blocks freed by the consumer's earlier copies are reused only after them
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                for e in range(c.num_experts):
                    flat: dict[str, torch.Tensor] = {}
                    for proj, (n, k) in expert_shapes(c).items():
                        if preset is None:
                            flat[f"{proj}.weight"] = dense((n, k), k**-0.5)
                        else:
                            qt = random_quantized((n, k), preset.experts, g, device)
                            flat.update({f"{proj}.{name}": t for name, t in qt.tensors().items()})
                    layer.experts[e] = {k: v.cpu() for k, v in flat.items()} if experts_to_host else flat
            if side is not None:
                main.wait_stream(side)
        yield layer
