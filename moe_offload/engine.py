"""The composition root: ``load()`` wires config -> model -> weights -> tokenizer into an Engine.

Loading streams tensors from the checkpoint and routes each to its place in the model, so the model
is never held twice in memory. The CLI and the server are thin layers over ``load`` and ``Engine``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .errors import MoeOffloadError
from .flat import FlatLayout
from .generate import ChatSession, Completion, Generation, Session
from .grouped import StackedExperts
from . import checkpoint
from .loading import find_checkpoint_files, resolve_model_dir
from . import kernels
from .model import Attention, MoeTransformer, RMSNorm, Router
from .quant.hqq import QuantizedTensor, QuantSpec
from .quant.linear import QuantLinear
from .quant.presets import QuantPreset, make_preset
from .offload.cache import ExpertCache
from .offload.hybrid import HybridExecutor
from .offload.planner import Plan
from .offload.stats import CacheStats
from .offload.store import ExpertStore
from .placement import HOST_WEIGHTS, OffloadOptions, install_offload, plan_placement, prepare_offload
from .sampling import SamplingParams
from .text import Tokenizer
from .weights import LayerWeights, QuantExpert, build_expert, expert_layout, expert_shapes, iter_layers, quantize_layers

# progress(description, completed, total): the CLI draws a bar with it; the API stays silent by default.
Progress = Callable[[str, int, int], None]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MoeOffloadError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoeOffloadError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise MoeOffloadError(f"--device {device}: only cpu and cuda are supported")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MoeOffloadError(f"--dtype {dtype!r} is not supported; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def assemble(model: MoeTransformer, layers: Iterable[LayerWeights], device: torch.device, dtype: torch.dtype,
             expert_spec: QuantSpec | None, source: Path, store: ExpertStore | None = None,
             on_host: Iterable[str] = ()) -> None:
    """Put streamed layer weights into a meta-device model: parameters, quantized linears, and experts
    (into the model, or into the host ``store`` when they are offloaded). Parameters named in ``on_host`` go to host
    memory instead, pinned where the device is a GPU (the embedding table of an offloading plan)."""
    on_host = set(on_host)
    config = model.config
    expected = dict(model.named_parameters())
    for layer in layers:
        for name, tensor in layer.params.items():
            if name not in expected:
                raise MoeOffloadError(f"{source}: tensor {name!r} does not fit the architecture in config.json")
            if tensor.shape != expected[name].shape:
                raise MoeOffloadError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)} "
                                      f"but config.json implies {tuple(expected[name].shape)}")
            module_path, _, attr = name.rpartition(".")
            if name in on_host:
                tensor = tensor.to(device="cpu", dtype=dtype)
                tensor = tensor.pin_memory() if device.type == "cuda" else tensor
            else:
                tensor = tensor.to(device=device, dtype=dtype)
            setattr(model.get_submodule(module_path), attr, nn.Parameter(tensor, requires_grad=False))
        for module_path, qt in layer.quantized.items():
            target = _linear(model, module_path, source)
            if (target.out_features, target.in_features) != tuple(qt.shape):
                raise MoeOffloadError(f"{source}: quantized {module_path!r} is {tuple(qt.shape)} but config.json "
                                      f"implies {(target.out_features, target.in_features)}")
            bias = None if target.bias is None else target.bias.detach()  # loaded with layer.params (Qwen, OLMoE)
            model.set_submodule(module_path, QuantLinear(qt.to(device), bias))
        if layer.experts:
            moe = model.layers[layer.index].moe
            if moe is None:
                raise MoeOffloadError(f"{source}: layer {layer.index} has experts but config.json makes it a dense "
                                      "layer (mlp_only_layers / decoder_sparse_step)")
            experts, number = moe.experts, config.moe_layers.index(layer.index)  # offloading's layer number
            for e, flat in layer.experts.items():
                if not 0 <= e < config.num_experts:
                    raise MoeOffloadError(f"{source}: layer {layer.index} has expert {e} but config.json says "
                                          f"num_local_experts={config.num_experts}")
                _check_expert(flat, config, expert_spec, source, layer.index, e)
                if store is None and expert_spec is not None and device.type == "cuda":
                    # Resident quantized experts on a GPU: one stack per layer, so decode can pick them on the device.
                    if not isinstance(experts, StackedExperts):
                        experts = StackedExperts(FlatLayout.of(flat), config, expert_spec, device)
                        moe.set_experts(experts)
                    experts.put(e, flat)
                    continue
                target = torch.device("cpu") if store is not None else device
                moved = {k: v.to(device=target, dtype=dtype if v.is_floating_point() and expert_spec is None
                                 else v.dtype) for k, v in flat.items()}
                if store is not None:
                    store.put((number, e), moved)  # straight from the file to host memory
                else:
                    experts.experts[e] = build_expert(moved, config, expert_spec)
    model.tie_weights()
    for i, block in enumerate(model.moe_blocks()):
        if isinstance(block.experts, StackedExperts) and len(block.experts.filled) != config.num_experts:
            raise MoeOffloadError(f"{source}: MoE layer {i} has {len(block.experts.filled)} of {config.num_experts} "
                                  "experts; the checkpoint is incomplete")
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if missing:
        raise MoeOffloadError(
            f"{source}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]!r}; "
            "the checkpoint is incomplete"
        )
    if device.type == "cuda" and kernels.available():
        install_fused_kernels(model)


def install_fused_kernels(model: MoeTransformer) -> None:
    """One launch each for the norms, RoPE and routing (kernels/fused.py) in every step on the GPU, and for a
    prefill's per-token sum of its experts' rows (model.FUSED_RANK_SUM).

    Installed for every CUDA model alike, so resident and offloaded runs still compute the same bits."""
    from . import model as model_code
    from .kernels import fused

    model_code.FUSED_RANK_SUM = fused.weighted_sum
    for module in list(model.modules()):
        if isinstance(module, RMSNorm):
            module.fused = fused.rms_norm
        elif isinstance(module, Attention):
            module.fused_rope = fused.rope
            module.fused_qkv = _fused_qkv(module)
        elif isinstance(module, Router):
            module.fused = fused.route


def install_int8_activations(model: MoeTransformer, slot_experts: Iterable[nn.Module] = ()) -> None:
    """Every 2-, 3- or 4-bit expert (resident, or an offload cache slot's) rounds its decode inputs to int8 per
    block of 32 (8-bit experts stay exact: not measured)."""
    for module in [*model.modules(), *slot_experts]:
        if isinstance(module, QuantExpert) and module.gate_proj.spec.bits in (2, 3, 4):
            module.int8_activations = True


def _fused_qkv(attn: Attention) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """q, k and v projections as one matmul over their weights stacked by rows: one GEMV at decode instead
    of three (the small k/v GEMVs alone use a GPU poorly). The three modules are left holding row views of
    the stacked tensors, so no weight is stored twice. None when the three are not alike (they stay apart)."""
    projs = [attn.q_proj, attn.k_proj, attn.v_proj]
    if all(isinstance(p, QuantLinear) for p in projs):
        if len({(p.spec, p.in_features, p._qnames) for p in projs}) != 1 or any(p.matmul is not None for p in projs):
            return None
        names, slots = projs[0]._qnames, [p._buffers for p in projs]
    elif all(type(p) is nn.Linear for p in projs) and len({p.weight.dtype for p in projs}) == 1:
        names, slots = ("weight",), [p._parameters for p in projs]
    else:
        return None
    stacked = {n: torch.cat([slot[n] for slot in slots]) for n in names}
    bias = None
    if any(p.bias is not None for p in projs):
        like = next(p.bias for p in projs if p.bias is not None)
        bias = torch.cat([p.bias if p.bias is not None else like.new_zeros(p.out_features) for p in projs])
    start = 0
    for p, slot in zip(projs, slots):
        for n in names:
            view = stacked[n][start : start + p.out_features]  # contiguous: whole rows
            slot[n] = nn.Parameter(view, requires_grad=False) if slot is p._parameters else view
        start += p.out_features
    if names == ("weight",):
        weight = stacked["weight"]
        return lambda x: F.linear(x, weight, bias)
    # A bound method, not the module: the stacked weights must not join the model's state_dict a second time.
    return QuantLinear(QuantizedTensor.assemble(stacked, (start, projs[0].in_features), projs[0].spec), bias).forward


def _linear(model: nn.Module, path: str, source: Path) -> nn.Linear:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise MoeOffloadError(f"{source}: quantized tensor {path!r} does not fit the architecture in config.json")
    return module


def _check_expert(flat, config: ModelConfig, spec: QuantSpec | None, source: Path, layer: int, e: int) -> None:
    for proj, shape in expert_shapes(config).items():
        if spec is None:
            t = flat.get(f"{proj}.weight")
            if t is None:
                raise MoeOffloadError(f"{source}: layer {layer} expert {e} has no {proj} weight; the checkpoint is incomplete")
            if tuple(t.shape) != shape:
                raise MoeOffloadError(f"{source}: tensor layers.{layer}.experts.{e}.{proj}.weight has shape "
                                      f"{tuple(t.shape)} but config.json implies {shape}")


@dataclass(frozen=True)
class LoadOptions:
    device: torch.device
    dtype: torch.dtype
    max_context: int
    cuda_graphs: bool = True  # decode replays each layer's dense part from a CUDA graph (CUDA only)
    int8_activations: bool = False  # decode: 2/3/4-bit experts take int8-rounded inputs (kernels/gemv_int8.py)


class Engine:
    """A loaded model ready to generate: ``engine.generate(...)``, ``engine.stream(...)``, ``engine.new_chat()``."""

    def __init__(self, config: ModelConfig, model: MoeTransformer, tokenizer: Tokenizer | None, directory: Path,
                 options: LoadOptions):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.directory, self.options = directory, options
        eos = list(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = tuple(eos)
        self.preset: QuantPreset | None = None  # quantization settings, if quantized
        self.plan: Plan | None = None  # the expert placement, if experts are offloaded
        self.cache_stats: CacheStats | None = None  # expert-cache telemetry, if offloaded
        self.expert_cache: ExpertCache | None = None
        self.hybrid: HybridExecutor | None = None  # the CPU path for decode misses, when on
        self._session: Session | None = None  # reused by generate()/stream(): repeated prefixes are free

    @property
    def device(self) -> torch.device:
        return self.options.device

    @property
    def max_context(self) -> int:
        return self.options.max_context

    def _scratch(self) -> Session:
        if self._session is None:
            self._session = self.new_session()
        return self._session

    def new_session(self) -> Session:
        return Session(self.model, self.max_context, cuda_graphs=self.options.cuda_graphs)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise MoeOffloadError(f"{self.directory} has no tokenizer; pass token ids")
        return self.tokenizer.encode(prompt)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **overrides) -> Generation:
        """Generate from a plain prompt (text or token ids), streaming TokenEvents."""
        params = _params(params, overrides)
        return Generation(self._scratch(), self.tokenizer, self.encode(prompt), params, self.eos_ids)

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **overrides) -> Completion:
        return self.stream(prompt, params, **overrides).result()

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, **overrides) -> Completion:
        """One assistant answer to a whole conversation (chat template applied)."""
        ids = self.tokenizer.apply_chat_template(messages)
        return Generation(self._scratch(), self.tokenizer, ids, _params(params, overrides), self.eos_ids).result()

    def new_chat(self, system: str | None = None) -> ChatSession:
        """A multi-turn conversation with its own KV cache, reused from turn to turn."""
        return ChatSession(self.new_session(), self.tokenizer, self.eos_ids, system=system)


def _params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    if params is None:
        return SamplingParams(**overrides)
    if overrides:
        from dataclasses import replace

        return replace(params, **overrides)
    return params


def _counter(progress: Progress | None, description: str, total: int) -> Callable[[], None]:
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(description, done, total)

    return tick


def open_layers(directory: Path, config: ModelConfig, quantize: str | QuantPreset | None = None,
                verify: bool = True, progress: Progress | None = None,
                quantize_device: torch.device | None = None) -> tuple[Iterator[LayerWeights], QuantPreset | None]:
    """Stream a checkpoint's layers: our quantized format as stored, or a Hugging Face checkpoint
    (quantized on the fly when ``quantize`` names a preset)."""
    if checkpoint.is_quantized(directory):
        manifest = checkpoint.read_manifest(directory, config)
        if quantize is not None:
            raise MoeOffloadError(f"{directory}: already quantized with preset {manifest.preset.name}; "
                                  "drop --quantize")
        if verify:
            checkpoint.verify_checksums(manifest, progress)
        tick = _counter(progress, "Loading weights", checkpoint.count_tensors(manifest))
        return checkpoint.iter_checkpoint_layers(manifest, tick), manifest.preset
    files = find_checkpoint_files(directory)
    if quantize is None:
        return iter_layers(files, _counter(progress, "Loading weights", len(files.weight_map))), None
    preset = quantize if isinstance(quantize, QuantPreset) else make_preset(quantize)
    qdev = quantize_device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tick = _counter(progress, f"Quantizing ({preset.name})", len(files.weight_map))
    return quantize_layers(iter_layers(files, tick), preset, qdev), preset


def load(model: str | os.PathLike, *, device: str | torch.device | None = "auto",
         dtype: str | torch.dtype | None = "auto", max_context: int = 4096, revision: str | None = None,
         quantize: str | QuantPreset | None = None, verify: bool = True,
         offload: OffloadOptions | None = None, cuda_graphs: bool = True, int8_activations: bool = False,
         progress: Progress | None = None) -> Engine:
    """Load MODEL (a local directory or a Hugging Face Hub repo id) for generation.

    A checkpoint written by ``moe-offload quantize`` is recognized by its manifest; ``quantize="4/2"``
    quantizes an ordinary checkpoint while loading. ``verify=False`` skips shard checksums.
    ``max_context`` sizes the preallocated KV cache (capped at the model's max_position_embeddings).
    ``offload`` places experts: see OffloadOptions (by default, offload only what does not fit the GPU).
    ``cuda_graphs`` replays each layer's dense part of a decode step from a CUDA graph (CUDA only).
    ``int8_activations``: at decode, the inputs of 2-, 3- and 4-bit experts are rounded to int8 per block of 32, as
    llama.cpp does: the expert GEMVs run about 1.3x faster on an H100, and each expert's output moves by about 1%
    (not exact; prefill stays exact).
    """
    directory = resolve_model_dir(model, revision)
    config = ModelConfig.from_file(directory / "config.json")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if max_context < 2:
        raise MoeOffloadError(f"--max-context {max_context} must be at least 2")
    options = LoadOptions(dev, dt, min(max_context, config.max_position_embeddings), cuda_graphs, int8_activations)
    tokenizer = Tokenizer(directory)
    layers, preset = open_layers(directory, config, quantize, verify, progress)
    return _build(config, tokenizer, directory, layers, preset, options, offload)


def _build(config: ModelConfig, tokenizer: Tokenizer | None, source: Path,
           layers: Iterable[LayerWeights] | Callable[[bool], Iterable[LayerWeights]],
           preset: QuantPreset | None, options: LoadOptions, offload: OffloadOptions | None) -> Engine:
    """``layers``: the weights, or a function of whether experts are offloaded that gives them."""
    dev, dt = options.device, options.dtype
    offload = offload or OffloadOptions()
    plan = plan_placement(config, preset, dev, dt, options.max_context, offload)
    if callable(layers):
        layers = layers(plan is not None)
    with torch.device("meta"):
        net = MoeTransformer(config)
    store, slots = prepare_offload(net, expert_layout(config, preset, dt), offload, plan, dev) if plan else (None, None)
    on_host = HOST_WEIGHTS if plan is not None and plan.host_weights_bytes else ()
    assemble(net, layers, dev, dt, preset.experts if preset else None, source, store, on_host)
    engine = Engine(config, net, tokenizer, source, options)
    engine.preset, engine.plan = preset, plan
    if plan is not None:
        engine.expert_cache, engine.hybrid = install_offload(net, store, plan, preset, dev, offload, slots)
        engine.cache_stats = engine.expert_cache.stats
    if options.int8_activations:
        install_int8_activations(net, engine.expert_cache.modules if engine.expert_cache else ())
    net.eval()
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # loading's transients (synthetic_layers: whole segments of their own) given back
    return engine


def load_synthetic(name: str, *, preset: str | QuantPreset | None = "4/2", device: str | torch.device | None = "auto",
                   dtype: str | torch.dtype | None = "auto", max_context: int = 4096,
                   offload: OffloadOptions | None = None, seed: int = 0, cuda_graphs: bool = True,
                   int8_activations: bool = False, progress: Progress | None = None) -> Engine:
    """A model with real shapes (``mixtral-8x7b``, ``mixtral-8x22b``, ``qwen3-30b-a3b``, ``olmoe-1b-7b``,
    ``qwen1.5-moe-a2.7b``, ``tiny``, ``tiny-qwen3``) and random weights, built quantized on the device. It has no tokenizer:
    feed it token ids."""
    from .synthetic import synthetic_config, synthetic_layers

    config = synthetic_config(name)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    chosen = None if preset is None else preset if isinstance(preset, QuantPreset) else make_preset(preset)
    options = LoadOptions(dev, dt, min(max_context, config.max_position_embeddings), cuda_graphs, int8_activations)
    tick = _counter(progress, f"Building synthetic {name}", config.num_layers + 1)

    def layers(offloaded: bool):  # offloaded experts go straight to host memory, one by one
        for layer in synthetic_layers(config, chosen, dev, dt, seed, experts_to_host=offloaded):
            yield layer
            tick()

    return _build(config, None, Path(f"synthetic:{name}"), layers, chosen, options, offload)
