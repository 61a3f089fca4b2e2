"""The quantized checkpoint format: round trip, atomic writes, and every way it can be damaged."""

import json
import shutil

import pytest
import torch

import moe_offload
from moe_offload import MoeOffloadError
from moe_offload.checkpoint import MANIFEST, write_checkpoint
from moe_offload.config import ModelConfig
from moe_offload.engine import open_layers
from moe_offload.quant.presets import QuantPreset, make_preset


def logits(engine, ids=tuple(range(3, 40))):
    return engine.model(torch.tensor([list(ids)]), engine.model.new_kv_cache(64), 0)


@pytest.fixture(scope="module")
def quantized_dir(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-4-2"
    config = ModelConfig.from_file(tiny_dir / "config.json")
    preset = make_preset("4/2")
    layers, _ = open_layers(tiny_dir, config, preset, quantize_device=torch.device("cpu"))
    write_checkpoint(out, layers, tiny_dir, config, preset)
    return out


def load(directory, **kw):
    return moe_offload.load(directory, device="cpu", dtype="float32", **kw)


def test_round_trip_equals_quantizing_while_loading(tiny_dir, quantized_dir):
    from_disk = load(quantized_dir)
    on_the_fly = load(tiny_dir, quantize="4/2")
    assert from_disk.preset.name == "4/2" and from_disk.preset.experts.quant_meta
    torch.testing.assert_close(logits(from_disk), logits(on_the_fly), atol=0, rtol=0)
    manifest = json.loads((quantized_dir / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["quantization"]["experts"]["bits"] == 2
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"].values())
    # every expert is one contiguous stored tensor
    experts = [n for n, e in manifest["tensors"].items() if e["kind"] == "expert"]
    assert len(experts) == 2 * 4 and all(manifest["tensors"][n]["dtype"] == "uint8" for n in experts)
    # tokenizer and config came along
    assert (quantized_dir / "tokenizer.json").exists() and (quantized_dir / "config.json").exists()


def test_lean_metadata_round_trip(tiny_dir, quantized_dir, tmp_path):
    """4/2-lean (4-bit scale and zero codes sharing a byte) through the manifest and the expert store, and an old
    manifest without meta_bits still reads as 8-bit."""
    out = tmp_path / "lean"
    config = ModelConfig.from_file(tiny_dir / "config.json")
    preset = make_preset("4/2-lean")
    layers, _ = open_layers(tiny_dir, config, preset, quantize_device=torch.device("cpu"))
    write_checkpoint(out, layers, tiny_dir, config, preset)
    from_disk = load(out)
    assert from_disk.preset.experts.meta_bits == 4 and from_disk.preset.name == "4/2-lean"
    torch.testing.assert_close(logits(from_disk), logits(load(tiny_dir, quantize="4/2-lean")), atol=0, rtol=0)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["quantization"]["experts"]["meta_bits"] == 4
    # smaller experts than 4/2's: the same 2-bit codes, one metadata byte per group instead of two
    from moe_offload.flat import FlatLayout

    expert_bytes = lambda m: FlatLayout.from_json(m["expert_layout"]).nbytes
    four_two = json.loads((quantized_dir / MANIFEST).read_text())
    groups = 3 * config.hidden_size * config.intermediate_size // 16
    assert expert_bytes(four_two) - expert_bytes(manifest) == groups
    assert QuantPreset.from_json({**manifest["quantization"], "experts": {"bits": 2, "group_size": 16,
                                                                          "quant_meta": True}}).experts.meta_bits == 8


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupted_shard_detected_and_no_verify_skips(quantized_dir, tmp_path):
    d = copy(quantized_dir, tmp_path / "m")
    shard = d / "layer-001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the tensor data, header intact
    shard.write_bytes(bytes(data))
    with pytest.raises(MoeOffloadError, match="layer-001.safetensors: checksum mismatch"):
        load(d)
    load(d, verify=False)  # the header is intact, so it loads when told not to check


def test_missing_shard(quantized_dir, tmp_path):
    d = copy(quantized_dir, tmp_path / "m")
    (d / "layer-000.safetensors").unlink()
    with pytest.raises(MoeOffloadError, match="layer-000.safetensors: shard listed in moe_offload.json is missing"):
        load(d)


def edit_manifest(d, fn):
    path = d / MANIFEST
    manifest = json.loads(path.read_text())
    fn(manifest)
    path.write_text(json.dumps(manifest))


def test_manifest_disagreeing_with_config(quantized_dir, tmp_path):
    d = copy(quantized_dir, tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(MoeOffloadError, match="rms_norm_eps"):
        load(d)


def test_manifest_disagreeing_with_tensors(quantized_dir, tmp_path):
    d = copy(quantized_dir, tmp_path / "m")
    edit_manifest(d, lambda m: m["tensors"]["norm.weight"].update(tensor_shape=[65]))
    with pytest.raises(MoeOffloadError, match="'norm.weight' is torch.bfloat16 \\[64\\] but moe_offload.json says"):
        load(d)


def test_unknown_format_version(quantized_dir, tmp_path):
    d = copy(quantized_dir, tmp_path / "m")
    edit_manifest(d, lambda m: m.update(format_version=99))
    with pytest.raises(MoeOffloadError, match="format_version 99 is not supported"):
        load(d)


def test_quantizing_a_quantized_checkpoint_is_refused(quantized_dir):
    with pytest.raises(MoeOffloadError, match="already quantized with preset 4/2"):
        load(quantized_dir, quantize="4/3")


def test_interrupted_write_leaves_nothing(tiny_dir, tmp_path):
    config = ModelConfig.from_file(tiny_dir / "config.json")
    preset = make_preset("4/4")
    layers, _ = open_layers(tiny_dir, config, preset, quantize_device=torch.device("cpu"))

    def interrupted():
        for i, layer in enumerate(layers):
            if i == 2:
                raise KeyboardInterrupt
            yield layer

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(out, interrupted(), tiny_dir, config, preset)
    assert list(tmp_path.iterdir()) == []


def teacher_forced_agreement(a, b, ids):
    return (logits(a, ids).argmax(-1) == logits(b, ids).argmax(-1)).float().mean().item()


@pytest.mark.parametrize("preset", ["8/8", "4/4", "4/3", "4/2", "4/2-lean"])
def test_presets_end_to_end(tiny_dir, tiny_engine, preset, record_property):
    quantized = load(tiny_dir, quantize=preset)
    ids = tiny_engine.encode("The quick brown fox jumps over the lazy dog. Mixture of experts models route each token.")
    agreement = teacher_forced_agreement(quantized, tiny_engine, ids)
    record_property("top1_agreement", agreement)
    print(f"preset {preset}: greedy next-token agreement with the unquantized model {agreement:.2f}")
    text = quantized.generate("Hello", max_new_tokens=8, ignore_eos=True)
    assert text.completion_tokens == 8
    if preset == "8/8":
        assert agreement >= 0.95
        q, ref = logits(quantized), logits(tiny_engine)
        assert (q - ref).abs().mean() < 0.05 * ref.abs().mean()
    else:
        assert agreement > 0.1  # far above chance (1/320): a damaged pipeline would not get here
