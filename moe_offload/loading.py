"""Checkpoint loading: a local directory or Hub id -> a stream of (canonical name, tensor).

Canonical names are this package's parameter names (``layers.3.self_attn.q_proj.weight``); expert
weights come out per expert as ``layers.{i}.experts.{e}.{gate,up,down}_proj.weight`` whichever of the
Hugging Face layouts the checkpoint uses (Mixtral's ``block_sparse_moe.experts.{e}.w1/w2/w3``, the
``mlp.experts.{e}.*_proj`` of Qwen-MoE and OLMoE, or the fused ``mlp.experts.gate_up_proj`` tensors that
transformers >= 5 holds in memory). Tensors are read one at a time from memory-mapped safetensors, so the
model is never held twice in RAM. Loading knows nothing about offloading.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import MoeOffloadError

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
EXPERT_KEY = re.compile(r"layers\.(\d+)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")

_L = r"^model\.layers\.(\d+)\."
# Hugging Face name -> canonical name; the first match wins. The families' names do not collide, so one
# list serves them all: ``mlp.gate`` is a router, ``mlp.gate_proj`` a dense layer's MLP (Qwen).
_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"^model\.embed_tokens\.weight$"), "embed_tokens.weight"),
    (re.compile(r"^model\.norm\.weight$"), "norm.weight"),
    (re.compile(r"^lm_head\.weight$"), "lm_head.weight"),
    (re.compile(_L + r"(input_layernorm|post_attention_layernorm)\.weight$"), r"layers.\1.\2.weight"),
    (re.compile(_L + r"self_attn\.([qkvo]_proj)\.(weight|bias)$"), r"layers.\1.self_attn.\2.\3"),  # bias: Qwen, OLMoE
    (re.compile(_L + r"self_attn\.([qk]_norm)\.weight$"), r"layers.\1.self_attn.\2.weight"),  # Qwen3, OLMoE
    (re.compile(_L + r"(?:block_sparse_moe|mlp)\.gate\.weight$"), r"layers.\1.moe.router.gate.weight"),
    (re.compile(_L + r"mlp\.shared_expert\.(gate_proj|up_proj|down_proj)\.weight$"),
     r"layers.\1.moe.shared_expert.\2.weight"),  # Qwen2-MoE
    (re.compile(_L + r"mlp\.shared_expert_gate\.weight$"), r"layers.\1.moe.shared_expert_gate.weight"),
    (re.compile(_L + r"mlp\.(gate_proj|up_proj|down_proj)\.weight$"), r"layers.\1.mlp.\2.weight"),  # dense layers
    (re.compile(_L + r"block_sparse_moe\.experts\.(\d+)\.w1\.weight$"), r"layers.\1.experts.\2.gate_proj.weight"),
    (re.compile(_L + r"block_sparse_moe\.experts\.(\d+)\.w3\.weight$"), r"layers.\1.experts.\2.up_proj.weight"),
    (re.compile(_L + r"block_sparse_moe\.experts\.(\d+)\.w2\.weight$"), r"layers.\1.experts.\2.down_proj.weight"),
    (re.compile(_L + r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"),
     r"layers.\1.experts.\2.\3.weight"),  # Qwen-MoE, OLMoE
]
_FUSED = re.compile(_L + r"mlp\.experts\.(gate_up_proj|down_proj)$")


def resolve_model_dir(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local directory as is; otherwise a Hub repo id fetched into the standard HF cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.exists():
        raise MoeOffloadError(f"{path}: is a file; MODEL must be a model directory or a Hub repo id")
    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise MoeOffloadError(f"{text}: no such model directory (and not a Hub repo id of the form owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise MoeOffloadError(
            f"{text}: not in the Hugging Face cache and the Hub cannot be reached (HF_HUB_OFFLINE="
            f"{os.environ.get('HF_HUB_OFFLINE', '0')}); download it first or pass a local directory"
        ) from None
    except RepositoryNotFoundError:
        raise MoeOffloadError(f"{text}: no such repository on the Hugging Face Hub (or it needs a token: HF_TOKEN)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise MoeOffloadError(f"{text}: could not fetch from the Hugging Face Hub: {str(e).splitlines()[0]}") from None


@dataclass(frozen=True)
class CheckpointFiles:
    directory: Path
    weight_map: dict[str, Path]  # HF tensor name -> shard file

    @property
    def shards(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))


def find_checkpoint_files(directory: Path) -> CheckpointFiles:
    """Index the safetensors of a checkpoint: sharded (with its index) or a single file."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MoeOffloadError(f"{index}: not a valid safetensors index ({e})") from None
        weight_map = {name: directory / shard for name, shard in mapping.items()}
        for shard in sorted(set(weight_map.values())):
            if not shard.exists():
                raise MoeOffloadError(f"{shard}: shard listed in {index.name} is missing; re-download the checkpoint")
        return CheckpointFiles(directory, weight_map)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise MoeOffloadError(f"{directory}: no *.safetensors files (only safetensors checkpoints are supported)")
    weight_map = {}
    for file in files:
        with _open(file) as f:
            weight_map.update({name: file for name in f.keys()})
    return CheckpointFiles(directory, weight_map)


def _open(file: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise MoeOffloadError(f"{file}: not a readable safetensors file ({e}); re-download it") from None


def canonical_name(hf_name: str) -> str | None:
    for pattern, replacement in _RULES:
        if pattern.match(hf_name):
            return pattern.sub(replacement, hf_name)
    return None


def iter_tensors(
    files: CheckpointFiles, on_read: Callable[[], None] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical name, tensor) one tensor at a time; fused expert tensors are split per expert.

    Tensors the model does not use (e.g. rotary caches) are skipped. ``on_read`` is called once per
    checkpoint tensor read (``len(files.weight_map)`` calls in all), for progress bars.
    """
    from safetensors import SafetensorError

    by_shard: dict[Path, list[str]] = {}
    for name, shard in files.weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in sorted(by_shard.items()):
        with _open(shard) as f:
            present = set(f.keys())
            for name in sorted(names):
                if name not in present:
                    raise MoeOffloadError(f"{shard}: tensor {name!r} is listed in the index but missing from the shard")
                try:
                    tensor = f.get_tensor(name)
                except (SafetensorError, RuntimeError, OSError) as e:
                    raise MoeOffloadError(f"{shard}: cannot read tensor {name!r} ({e}); the file is corrupt") from None
                if on_read is not None:
                    on_read()
                fused = _FUSED.match(name)
                if fused:
                    layer, kind = fused.groups()
                    yield from _split_fused(int(layer), kind, tensor)
                    continue
                canonical = canonical_name(name)
                if canonical is not None:
                    yield canonical, tensor


def _split_fused(layer: int, kind: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    # transformers >= 5 stores experts as [E, 2I, D] (gate rows first, then up) and [E, D, I].
    for e in range(tensor.shape[0]):
        if kind == "gate_up_proj":
            gate, up = tensor[e].chunk(2, dim=0)
            yield f"layers.{layer}.experts.{e}.gate_proj.weight", gate
            yield f"layers.{layer}.experts.{e}.up_proj.weight", up
        else:
            yield f"layers.{layer}.experts.{e}.down_proj.weight", tensor[e]
