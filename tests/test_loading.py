"""Loading both expert key layouts, sharded checkpoints, Hub ids, and every kind of bad checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_offload
from conftest import make_checkpoint
from moe_offload import MoeOffloadError


def logits(engine, ids=(1, 5, 9, 33, 70, 100)):
    kv = engine.model.new_kv_cache(16)
    return engine.model(torch.tensor([list(ids)]), kv, 0)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {
        "per_expert": make_checkpoint(root / "per_expert", seed=5),
        "fused": make_checkpoint(root / "fused", layout="fused", seed=5),
        "sharded": make_checkpoint(root / "sharded", max_shard_size="100KB", seed=5),
    }


def test_all_layouts_load_identically(layouts):
    assert len(list(layouts["sharded"].glob("*.safetensors"))) > 1
    assert (layouts["sharded"] / "model.safetensors.index.json").exists()
    results = {name: logits(moe_offload.load(d, device="cpu", dtype="float32")) for name, d in layouts.items()}
    torch.testing.assert_close(results["fused"], results["per_expert"], atol=0, rtol=0)
    torch.testing.assert_close(results["sharded"], results["per_expert"], atol=0, rtol=0)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def expect_error(directory, *fragments):
    with pytest.raises(MoeOffloadError) as info:
        moe_offload.load(directory, device="cpu", dtype="float32")
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nope", str(tmp_path / "nope"), "no such model directory")


def test_missing_shard(layouts, tmp_path):
    d = copy_checkpoint(layouts["sharded"], tmp_path / "m")
    shard = sorted(d.glob("*.safetensors"))[1]
    shard.unlink()
    expect_error(d, shard.name, "missing")


def test_tensor_missing_from_shard(layouts, tmp_path):
    from safetensors.torch import load_file, save_file

    d = copy_checkpoint(layouts["per_expert"], tmp_path / "m")
    state = load_file(d / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    expect_error(d, "layers.1.self_attn.k_proj.weight", "missing")


def test_tensor_missing_from_shard_listed_in_index(layouts, tmp_path):
    d = copy_checkpoint(layouts["sharded"], tmp_path / "m")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = sorted(set(index["weight_map"].values()))[0]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(d, "model.layers.0.extra.weight", "missing from the shard")


@pytest.mark.parametrize("damage", ["truncate", "garbage-header"])
def test_corrupt_safetensors(layouts, tmp_path, damage):
    d = copy_checkpoint(layouts["per_expert"], tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    expect_error(d, "model.safetensors")


def test_unsupported_architecture(layouts, tmp_path):
    d = copy_checkpoint(layouts["per_expert"], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(config))
    expect_error(d, "config.json", "'llama'", "mixtral")


def test_shape_mismatch_names_tensor(layouts, tmp_path):
    d = copy_checkpoint(layouts["per_expert"], tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(config))
    expect_error(d, "experts", "shape")


def _hub_cache(root: Path, repo: str, src: Path) -> Path:
    """Lay out ``src`` as huggingface_hub's cache does for a downloaded snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    copy_checkpoint(src, repo_dir / "snapshots" / commit)
    return root


def run_cli(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "moe_offload", *args], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_hub_id_from_cache_offline_and_missing(layouts, tmp_path):
    cache = _hub_cache(tmp_path / "hub", "tiny-org/tiny-mixtral", layouts["per_expert"])
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    ok = run_cli("generate", "tiny-org/tiny-mixtral", "-p", "Hello", "--temperature", "0",
                 "--max-new-tokens", "4", "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["completion_tokens"] >= 1
    missing = run_cli("generate", "tiny-org/not-downloaded", "-p", "Hello", env=env)
    assert missing.returncode == 1
    assert "Traceback" not in missing.stderr
    assert "tiny-org/not-downloaded" in missing.stderr and "HF_HUB_OFFLINE=1" in missing.stderr
