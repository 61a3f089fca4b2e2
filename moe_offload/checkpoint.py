"""Our quantized checkpoint format: safetensors shards (one per decoder layer) plus a JSON manifest.

Each expert is stored as ONE uint8 tensor holding all its tensors (packed w1/w2/w3 and their quant
metadata) back to back, described by a FlatLayout in the manifest: an expert is one read from disk and
one copy to the GPU. The manifest records the format version, the quantization settings, every tensor's
shape/dtype/shard, and a sha256 per shard. Writing goes to a hidden temporary directory renamed into
place at the end, so an interrupted run leaves nothing that loads as a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .config import ModelConfig
from .errors import MoeOffloadError
from .flat import DTYPE_NAMES, DTYPES_BY_NAME, FlatLayout
from .quant.hqq import QuantizedTensor, tensor_layout
from .quant.presets import QuantPreset
from .weights import LayerWeights, expert_layout

MANIFEST = "moe_offload.json"
FORMAT = "moe-offload-quantized"
FORMAT_VERSION = 1
WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", MANIFEST)
Progress = Callable[[str, int, int], None]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _shard_name(index: int | None) -> str:
    return "embeddings.safetensors" if index is None else f"layer-{index:03d}.safetensors"


def write_checkpoint(out: Path, layers: Iterable[LayerWeights], source_dir: Path, config: ModelConfig,
                     preset: QuantPreset, overwrite: bool = False) -> None:
    """Write quantized ``layers`` as a checkpoint at ``out``, atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise MoeOffloadError(f"{out}: already exists; choose another output path or pass --overwrite")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    layout = expert_layout(config, preset, torch.bfloat16)
    tensors_meta: dict[str, dict] = {}
    shards: dict[str, dict] = {}
    try:
        for layer in layers:
            shard = _shard_name(layer.index)
            tensors: dict[str, torch.Tensor] = {}
            for name, t in layer.params.items():
                tensors[name] = t.contiguous()
                tensors_meta[name] = {"kind": "param"}
            for module, qt in layer.quantized.items():
                for part, t in qt.tensors().items():
                    tensors[f"{module}.{part}"] = t.contiguous()
                tensors_meta[module] = {"kind": "quantized", "shape": list(qt.shape), "bits": qt.spec.bits,
                                        "group_size": qt.spec.group_size, "quant_meta": qt.spec.quant_meta,
                                        "meta_bits": qt.spec.meta_bits, "shard": shard}
            for e, flat in layer.experts.items():
                name = f"experts.{layer.index}.{e}"
                tensors[name] = layout.pack(flat)
                tensors_meta[name] = {"kind": "expert", "layer": layer.index, "expert": e}
            for name, t in tensors.items():
                entry = tensors_meta.setdefault(name, {"kind": "part"})
                entry.update(shard=shard, dtype=DTYPE_NAMES[t.dtype], tensor_shape=list(t.shape))
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            shards[shard] = {"sha256": _sha256(tmp / shard), "bytes": (tmp / shard).stat().st_size}
        for f in source_dir.iterdir():  # tokenizer, chat template, generation config ...
            if f.is_file() and not any(f.match(p) for p in WEIGHT_FILES) and f.name != "config.json":
                shutil.copy2(f, tmp / f.name)
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "quantization": preset.to_json(),
            "model_config": config.to_dict(), "expert_layout": layout.to_json(),
            "shards": shards, "tensors": tensors_meta,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        # config.json last: a partial directory has none, so it never loads as a model.
        shutil.copy2(source_dir / "config.json", tmp / "config.json")
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@dataclass(frozen=True)
class Manifest:
    directory: Path
    preset: QuantPreset
    expert_layout: FlatLayout
    shards: dict[str, dict]
    tensors: dict[str, dict]


def is_quantized(directory: Path) -> bool:
    return (directory / MANIFEST).exists()


def read_manifest(directory: Path, config: ModelConfig) -> Manifest:
    """Read and check the manifest against the format version and config.json."""
    path = directory / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoeOffloadError(f"{path}: not valid JSON ({e}); re-quantize the model") from None
    if raw.get("format") != FORMAT:
        raise MoeOffloadError(f"{path}: field 'format' is {raw.get('format')!r}, expected {FORMAT!r}")
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise MoeOffloadError(
            f"{path}: format_version {version!r} is not supported (this moe-offload reads {FORMAT_VERSION}); "
            "re-quantize with this version or upgrade moe-offload"
        )
    try:
        preset = QuantPreset.from_json(raw["quantization"])
        layout = FlatLayout.from_json(raw["expert_layout"])
        saved, shards, tensors = raw["model_config"], raw["shards"], raw["tensors"]
    except (KeyError, TypeError, ValueError) as e:
        raise MoeOffloadError(f"{path}: malformed manifest (field {e}); re-quantize the model") from None
    current = config.to_dict()
    for key, value in current.items():
        if key in saved and _jsonable(saved[key]) != _jsonable(value):
            raise MoeOffloadError(
                f"{path}: manifest says {key}={saved[key]!r} but config.json gives {value!r}; "
                "the files do not belong together: re-quantize from the original checkpoint"
            )
    if layout != expert_layout(config, preset, torch.bfloat16):
        raise MoeOffloadError(f"{path}: expert_layout does not match the config and quantization settings")
    return Manifest(directory, preset, layout, shards, tensors)


def _jsonable(value):
    return json.loads(json.dumps(value))


def verify_checksums(manifest: Manifest, progress: Progress | None = None) -> None:
    for i, (shard, info) in enumerate(sorted(manifest.shards.items())):
        path = manifest.directory / shard
        if not path.exists():
            raise MoeOffloadError(f"{path}: shard listed in {MANIFEST} is missing")
        if _sha256(path) != info["sha256"]:
            raise MoeOffloadError(f"{path}: checksum mismatch, the file is corrupt; re-quantize or re-copy it "
                                  "(--no-verify skips this check)")
        if progress:
            progress("Verifying checksums", i + 1, len(manifest.shards))


def iter_checkpoint_layers(manifest: Manifest, on_read: Callable[[], None] | None = None) -> Iterator[LayerWeights]:
    """The checkpoint as LayerWeights; expert tensors are views into their one stored buffer."""
    from safetensors import SafetensorError, safe_open

    by_shard: dict[str, list[str]] = {}
    for name, entry in manifest.tensors.items():
        if entry["kind"] != "quantized":
            by_shard.setdefault(entry["shard"], []).append(name)
    for shard in sorted(by_shard, key=lambda s: (s != "embeddings.safetensors", s)):
        path = manifest.directory / shard
        if not path.exists():
            raise MoeOffloadError(f"{path}: shard listed in {MANIFEST} is missing")
        index = None if shard == "embeddings.safetensors" else int(shard.split("-")[1].split(".")[0])
        layer, parts = LayerWeights(index), {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in by_shard[shard]:
                    entry = manifest.tensors[name]
                    t = f.get_tensor(name)
                    if list(t.shape) != entry["tensor_shape"] or t.dtype != DTYPES_BY_NAME[entry["dtype"]]:
                        raise MoeOffloadError(
                            f"{path}: tensor {name!r} is {t.dtype} {list(t.shape)} but {MANIFEST} says "
                            f"{entry['dtype']} {entry['tensor_shape']}"
                        )
                    if entry["kind"] == "param":
                        layer.params[name] = t
                    elif entry["kind"] == "expert":
                        layer.experts[entry["expert"]] = manifest.expert_layout.views(t)
                    else:
                        parts[name] = t
                    if on_read:
                        on_read()
        except (SafetensorError, OSError) as e:
            raise MoeOffloadError(f"{path}: not a readable safetensors file ({e}); re-quantize or re-copy it") from None
        for module, entry in manifest.tensors.items():
            if entry["kind"] == "quantized" and entry["shard"] == shard:
                from .quant.hqq import QuantSpec

                spec = QuantSpec(entry["bits"], entry["group_size"], entry["quant_meta"], entry.get("meta_bits", 8))
                names = tensor_layout(tuple(entry["shape"]), spec)
                try:
                    tensors = {n: parts[f"{module}.{n}"] for n in names}
                except KeyError as e:
                    raise MoeOffloadError(f"{path}: quantized tensor {module}.{e.args[0]} is missing") from None
                layer.quantized[module] = QuantizedTensor.from_tensors(tensors, tuple(entry["shape"]), spec)
        yield layer


def count_tensors(manifest: Manifest) -> int:
    return sum(1 for e in manifest.tensors.values() if e["kind"] != "quantized")
