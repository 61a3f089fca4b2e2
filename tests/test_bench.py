"""`bench` on a tiny synthetic model: the JSON is complete and its numbers agree with each other."""

import json

from typer.testing import CliRunner

from moe_offload.cli import app

KEYS = {"decode_tok_s", "prefill_tok_s", "limit_tok_s", "hit_rate", "prefetch_recall", "bytes_copied_per_token",
        "h2d_gb_s", "preset", "gpu_memory", "device", "peak_gpu_bytes", "peak_host_bytes", "runs", "command", "date"}


def bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--synthetic", "tiny", "--device", "cpu", "--prompt-tokens", "24",
                                      "--new-tokens", "8", "--json", str(out), *args])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_everything_fits(tmp_path):
    data = bench(tmp_path)
    assert KEYS <= set(data)
    assert data["hit_rate"] == 1.0 and data["bytes_copied_per_token"] == 0
    assert data["decode_tok_s"] > 0 and data["prefill_tok_s"] > 0 and data["preset"] == "4/2"
    # nothing to copy: the limit is the resident speed itself
    assert abs(data["limit_tok_s"] - data["decode_tok_s"]) / data["decode_tok_s"] < 1e-6


def test_offloaded_with_ablations(tmp_path):
    data = bench(tmp_path, "--offload-per-layer", "2", "--ablations")
    runs = {r["label"]: r for r in data["runs"]}
    assert set(runs) == {"resident", "full", "prefetch 1", "no cache"}  # prefetch is off by default
    assert runs["resident"]["hit_rate"] == 1.0 and runs["resident"]["bytes_copied_per_token"] == 0
    assert runs["no cache"]["hit_rate"] == 0.0
    assert runs["prefetch 1"]["prefetch"] == 1 and runs["full"]["prefetch"] == 0
    assert runs["prefetch 1"]["prefetch_recall"] > 0 and runs["full"]["prefetch_recall"] == 0
    full = runs["full"]
    assert 0 < full["hit_rate"] < 1 and full["bytes_copied_per_token"] > 0
    expected_limit = 1 / (full["bytes_copied_per_token"] / (full["h2d_gb_s"] * 1e9)
                          + runs["resident"]["decode_ms_per_token"] / 1e3)
    assert abs(full["limit_tok_s"] - expected_limit) / expected_limit < 1e-6
    # more bytes per token without a cache than with one
    assert runs["no cache"]["bytes_copied_per_token"] > full["bytes_copied_per_token"]


def test_table_keeps_each_run_on_one_line_in_a_log(tmp_path):
    """Printed to a pipe or a log (not a terminal), the table is not squeezed into 80 columns: one line per run."""
    result = CliRunner().invoke(app, ["bench", "--synthetic", "tiny", "--device", "cpu", "--prompt-tokens", "24",
                                      "--new-tokens", "8", "--cpu-layers", "1"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["full (1 CPU layers)", "no hybrid"]
    assert all(len(row.split("│")) == 13 for row in rows)  # 11 columns, none wrapped


def test_needs_model_or_synthetic(monkeypatch, tmp_path):
    monkeypatch.setattr("moe_offload.demo.DEMO_MODEL", tmp_path / "absent")  # no MODEL: the demo model, if shipped
    result = CliRunner().invoke(app, ["bench"])
    assert result.exit_code == 1 and "--synthetic" in result.stderr


def test_cpu_layers_run_beside_copies_only(tmp_path):
    """--cpu-layers N: the bench measures it and copies alone (no CPU layers) in the same run."""
    data = bench(tmp_path, "--cpu-layers", "1")
    labels = [r["label"] for r in data["runs"]]
    assert labels == ["full", "no hybrid"]
    full, copies = data["runs"]
    assert full["cpu_layers"] == 1 and full["cpu_experts_per_token"] > 0
    assert copies["cpu_layers"] == 0 and copies["cpu_experts_per_token"] == 0
    # the cost model that split the CPU layer's experts, as decode left it (a CPU call costs something)
    assert set(full["cost_model"]) == {"copy_ms", "cpu_ms", "cpu_fixed_ms"} and full["cost_model"]["cpu_ms"] > 0
    assert copies["cost_model"] is None


def test_device_lookup_on_runs_host_lookup_beside_it(tmp_path):
    data = bench(tmp_path, "--cpu-layers", "1", "--device-lookup", "on")
    runs = {r["label"]: r for r in data["runs"]}
    assert list(runs) == ["full", "host lookup", "no hybrid"]
    assert runs["full"]["device_lookup"] and not runs["host lookup"]["device_lookup"]
    assert runs["full"]["cpu_layers"] == runs["host lookup"]["cpu_layers"] == 1
    assert not runs["no hybrid"]["device_lookup"] and runs["no hybrid"]["cpu_layers"] == 0
    assert runs["full"]["in_place_per_token"] == 0  # no budget: the cached layer holds every expert


def test_release_frees_the_hybrid_path_too():
    import gc
    import weakref

    from moe_offload.bench import release
    from moe_offload.engine import load_synthetic
    from moe_offload.placement import OffloadOptions

    engine = load_synthetic("tiny", device="cpu", offload=OffloadOptions(cpu_layers=1))
    assert engine.hybrid is not None
    slots = weakref.ref(engine.expert_cache.slots)
    release(engine)
    gc.collect()
    assert slots() is None  # nothing (the CPU path included) keeps the cache's memory alive


def test_runs_keeps_only_the_runs_asked_for(tmp_path):
    data = bench(tmp_path, "--cpu-layers", "1", "--runs", "no hybrid")
    assert [r["label"] for r in data["runs"]] == ["no hybrid"]
    assert data["label"] == "no hybrid" and data["cpu_layers"] == 0  # the top level is the first run made


def test_runs_names_the_labels_it_offers(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--synthetic", "tiny", "--device", "cpu", "--cpu-layers", "1",
                                      "--runs", "full,bogus", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 1
    assert "--runs 'full,bogus': 'bogus' is not among this command's runs; choose from full, no hybrid" in result.output
    assert not (tmp_path / "b.json").exists()
