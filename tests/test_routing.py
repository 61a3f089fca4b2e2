"""Routing hooks: recording (checked against transformers' own routers) and trace replay (checked against a
model whose routers are replaced outright), the `trace` command and `bench --routing-trace`."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import moe_offload
from conftest import hf_model, make_checkpoint
from moe_offload.cli import app
from moe_offload.errors import MoeOffloadError
from moe_offload.placement import OffloadOptions
from moe_offload.routing import RoutingRecorder, TraceReplay, record_trace
from moe_offload.trace import RoutingTrace, read_trace, write_trace

runner = CliRunner()


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory) -> Path:
    """4 MoE layers of 8 experts, top-2: guesses 2 layers ahead exist."""
    return make_checkpoint(tmp_path_factory.mktemp("deep") / "model", num_hidden_layers=4, num_local_experts=8)


def reference_routing(directory: Path, windows: list[list[int]], lookahead: int = 2):
    """transformers' routers: chosen experts, weights and look-ahead guesses per token, per layer."""
    hf = hf_model(directory)
    layers = hf.model.layers
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, tuple] = {}

    def hook(i):
        def capture(module, args, out):
            inputs[i], outputs[i] = args[0].reshape(-1, args[0].shape[-1]), out
        return capture

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    steps, weights, guesses = [], [], []
    with torch.no_grad():
        for window in windows:
            hf(torch.tensor([window]))
            L, seen, chosen = len(layers), dict(inputs), dict(outputs)  # guessing below calls the gates again
            for t in range(len(window)):
                steps.append([chosen[l][2][t].tolist() for l in range(L)])
                weights.append([chosen[l][1][t].tolist() for l in range(L)])
                guesses.append([[layers[l].mlp.gate(seen[l - d][t : t + 1])[2][0].tolist() if l >= d else []
                                 for l in range(L)] for d in range(1, lookahead + 1)])
    for h in handles:
        h.remove()
    return steps, weights, guesses


def test_recording_matches_transformers(deep_dir):
    engine = moe_offload.load(deep_dir, device="cpu", dtype="float32", max_context=64)
    tokens = list(range(3, 40))
    trace = record_trace(engine.model, tokens, context=16, source="deep")
    assert (trace.num_layers, trace.num_experts, trace.top_k, trace.lookahead) == (4, 8, 2, 2)
    assert len(trace) == len(tokens) and trace.phases == ["prefill"] * len(tokens)
    steps, weights, guesses = reference_routing(deep_dir, [tokens[0:16], tokens[16:32], tokens[32:]])
    assert trace.steps == steps
    assert torch.allclose(torch.tensor(trace.weights), torch.tensor(weights), atol=1e-5)
    assert trace.guesses == guesses
    assert all(block.routing_hook is None for block in engine.model.moe_blocks())  # removed afterwards


def test_recording_leaves_outputs_alone(tiny_engine):
    prompt = list(range(3, 20))
    before = tiny_engine.new_session().prefill(prompt)[0]
    with RoutingRecorder(tiny_engine.model) as rec:
        during = tiny_engine.new_session().prefill(prompt)[0]
    assert torch.equal(before, during) and len(rec.trace()) == len(prompt)


class FixedRouter(nn.Module):
    """Stands in for a router: returns whatever the test set last (the reference for trace replay)."""

    def forward(self, x):
        return self.weights, self.indices


def routed_by_hand(engine, trace: RoutingTrace, positions: list[list[int]], feeds: list[list[int]]):
    """Logits of forward passes where each MoE layer's router is replaced by the trace's rows at ``positions``."""
    blocks = engine.model.moe_blocks()
    routers = [block.router for block in blocks]
    for block in blocks:
        block.router = FixedRouter()
    try:
        session, out = engine.new_session(), []
        for rows, ids in zip(positions, feeds):
            for l, block in enumerate(blocks):
                block.router.indices = torch.tensor([trace.steps[r][l] for r in rows])
                block.router.weights = torch.tensor([trace.weights[r][l] for r in rows], dtype=torch.float32)
            out.append(session.prefill(session.tokens + ids)[0] if len(ids) > 1 or not session.tokens
                       else session.step(ids[0]))
        return out
    finally:
        for block, router in zip(blocks, routers):
            block.router = router


def k3_trace(steps=5, layers=2, experts=4, seed=0) -> RoutingTrace:
    """Top-3 (the tiny model routes top-2), random weights that sum to 1."""
    g = torch.Generator().manual_seed(seed)
    idx = [[torch.randperm(experts, generator=g)[:3].tolist() for _ in range(layers)] for _ in range(steps)]
    w = torch.rand(steps, layers, 3, generator=g)
    w = (w / w.sum(-1, keepdim=True)).tolist()
    return RoutingTrace(layers, experts, 3, idx, ["decode"] * steps, "k3", weights=w)


@pytest.mark.parametrize("offload", [False, True])
def test_replay_equals_replaced_routers(tiny_dir, offload):
    options = OffloadOptions(offload_per_layer=2, force=True) if offload else None
    engine = moe_offload.load(tiny_dir, device="cpu", dtype="float32", max_context=64, offload=options)
    trace = k3_trace()
    # a 3-token prompt, then 4 decode steps: positions 3, 4, 5, 6 replay trace tokens 3, 4, 0, 1 (wrap at 5)
    feeds = [[5, 6, 7], [8], [9], [10], [11]]
    positions = [[0, 1, 2], [3], [4], [0], [1]]
    expected = routed_by_hand(engine, trace, positions, feeds)
    replay = TraceReplay(engine.model, trace).install()
    session = engine.new_session()
    got = [session.prefill(feeds[0])[0]] + [session.step(f[0]) for f in feeds[1:]]
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    replay.rewind()  # a new sequence starts at trace token 0 again
    assert torch.equal(engine.new_session().prefill(feeds[0])[0], expected[0])
    # a warm-up run: the same tokens with expert ids shifted by E/2
    shifted = RoutingTrace(2, 4, 3, [[[(e + 2) % 4 for e in c] for c in s] for s in trace.steps], source="shifted",
                           weights=trace.weights)
    replay.rewind(warmup=True)
    warm = engine.new_session().prefill(feeds[0])[0]
    replay.remove()
    assert torch.equal(warm, routed_by_hand(engine, shifted, positions[:1], feeds[:1])[0])
    assert not torch.equal(warm, expected[0])
    replay.install()
    assert "top-3 from the trace (the model's own top-2 unused)" in replay.describe()
    assert "WRAPS: 7 tokens per run exceed the trace's 5" in replay.describe(7) and "WRAPS" not in replay.describe(5)
    with pytest.raises(MoeOffloadError, match="already installed"):
        TraceReplay(engine.model, trace).install()
    replay.remove()


def test_replay_skips_incomplete_tokens_and_checks_shape(tiny_engine):
    trace = RoutingTrace(2, 4, 2, [[[0, 1], []], [[2, 3], [0, 1]], [[1, 2], [3, 0]]], ["prefill", "prefill", "decode"],
                         "t.csv")
    replay = TraceReplay(tiny_engine.model, trace)
    assert len(replay) == 2 and replay.indices[0, 1].tolist() == [0, 1]
    assert replay.weights[0, 0].tolist() == [0.5, 0.5]  # no weights in the trace: 1/k
    assert "2 complete tokens (1 prefill + 1 decode)" in replay.describe()
    with pytest.raises(MoeOffloadError, match="trace t.csv has 3 layers x 4 experts but the model has 2 x 4"):
        TraceReplay(tiny_engine.model, RoutingTrace(3, 4, 2, [], source="t.csv"))
    with pytest.raises(MoeOffloadError, match="no token routes every layer"):
        TraceReplay(tiny_engine.model, RoutingTrace(2, 4, 2, [[[0, 1], []]], source="t.csv"))


def test_trace_command(deep_dir, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    out = tmp_path / "traces" / "deep.jsonl"
    result = runner.invoke(app, ["trace", str(deep_dir), "--text", str(text), "--out", str(out), "--max-tokens",
                                 "50", "--context", "20", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    trace = read_trace(out)
    assert len(trace) == 50 and trace.lookahead == 2 and trace.weights is not None
    assert json.loads(out.read_text().splitlines()[0])["version"] == 2
    assert [p.name for p in out.parent.iterdir()] == ["deep.jsonl"]  # written atomically, no temp file left
    engine = moe_offload.load(deep_dir, device="cpu", dtype="float32", max_context=64)
    expected = record_trace(engine.model, engine.encode(text.read_text())[:50], context=20)
    assert trace.steps == expected.steps and trace.guesses == expected.guesses
    assert "prefetch recall 1 ahead" in result.stderr
    missing = runner.invoke(app, ["trace", str(deep_dir), "--text", str(tmp_path / "nope.txt"), "--out", str(out)])
    assert missing.exit_code == 1 and missing.stderr.strip().endswith("nope.txt: no such file")


def bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", "--synthetic", "tiny", "--device", "cpu", "--prompt-tokens", "12",
                                 "--new-tokens", "8", "--json", str(out), *args])
    return result, out


def test_bench_routing_trace_same_experts_always_hit(tmp_path):
    path = tmp_path / "same.jsonl"
    write_trace(RoutingTrace(2, 4, 1, [[[3], [0]]] * 4, ["decode"] * 4, "same"), path)
    # two slots per layer; no prefetch (the real routers' guesses would evict the trace's experts)
    result, out = bench(tmp_path, "--offload-per-layer", "2", "--prefetch", "0", "--routing-trace", str(path))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["hit_rate"] == 1.0 and data["bytes_copied_per_token"] == 0  # warm after prefill
    assert data["routing"].startswith("trace same.jsonl: 4 complete tokens") and "top-1 from the trace" in data["routing"]
    assert "WRAPS: 20 tokens per run exceed the trace's 4" in data["routing"]
    assert "Routing: trace same.jsonl" in result.stderr


def test_bench_routing_trace_varied(tmp_path):
    path = tmp_path / "k3.jsonl"
    write_trace(k3_trace(steps=7), path)
    result, out = bench(tmp_path, "--offload-per-layer", "2", "--routing-trace", str(path))
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert 0 < data["hit_rate"] < 1 and "top-3" in data["routing"]


def test_bench_routing_trace_mismatch(tmp_path):
    path = tmp_path / "deep.jsonl"
    write_trace(RoutingTrace(4, 8, 2, [[[0, 1]] * 4], ["decode"], "deep"), path)
    result, _ = bench(tmp_path, "--routing-trace", str(path))
    assert result.exit_code == 1
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines == ["error: trace deep.jsonl has 4 layers x 8 experts but the model has 2 x 4; use a trace "
                     "recorded with this model"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quantize, offload", [(None, False), ("4/4", False), ("4/4", True)])
def test_cuda_graphed_decode_replays_the_trace(tiny_dir, quantize, offload):
    """Decode through CUDA graphs sees the replayed routing, token by token, like eager decode."""
    options = OffloadOptions(offload_per_layer=2, force=True) if offload else None
    trace = k3_trace(steps=7)
    logits = []
    for graphs in (False, True):
        engine = moe_offload.load(tiny_dir, device="cuda", dtype="bfloat16", quantize=quantize, offload=options,
                                  cuda_graphs=graphs, max_context=64)
        TraceReplay(engine.model, trace).install()
        session = engine.new_session()
        token, out = int(session.prefill(list(range(3, 9)))[0].argmax()), []
        for _ in range(10):
            out.append(session.step(token))
            token = int(out[-1].argmax())
        logits.append(torch.stack(out))
    assert torch.equal(logits[0], logits[1])
