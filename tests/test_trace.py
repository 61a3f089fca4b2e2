import os
from pathlib import Path

import pytest

from moe_offload.errors import MoeOffloadError
from moe_offload.trace import RoutingTrace, TraceRecorder, check_matches, read_trace, write_trace

HEADER = "turn,phase,step,layer,slot,expert,weight,residency,expert_bytes"
PREAMBLE = [
    "# route_trace v1",
    "# model=/m.gguf arch=qwen3moe n_layer=2 n_expert=4 n_expert_used=2",
    "# layer=0 expert_bytes=100 dense_bytes=7",
    "# layer=1 expert_bytes=200 dense_bytes=7",
]
# A 2-token prefill (rows come layer by layer; token 0 lacks the last layer) and one decode token.
ROWS = [
    "0,0,0,0,0,3,0.6,0,100", "0,0,0,0,1,1,0.4,0,100",
    "0,0,1,0,0,2,0.5,0,100", "0,0,1,0,1,0,0.5,1,0",
    "0,0,1,1,1,2,0.3,0,200", "0,0,1,1,0,1,0.7,0,200",  # ranks out of order: placed by slot
    "0,1,2,0,0,0,0.9,1,0", "0,1,2,0,1,3,0.1,1,0",
    "0,1,2,1,0,2,0.8,1,0", "0,1,2,1,1,3,0.2,0,200",
]


def write_csv(tmp_path: Path, rows=ROWS, preamble=PREAMBLE, header=HEADER, name="t.route.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([*preamble, header, *rows]) + "\n")
    return path


def shared_file(*parts: str) -> Path:
    """A file of the shared data dir (MOE_OFFLOAD_SHARED, /work/shared or ../shared); skip if absent (CI)."""
    repo = Path(__file__).resolve().parents[1]
    for base in (os.environ.get("MOE_OFFLOAD_SHARED"), "/work/shared", repo.parent / "shared"):
        if base and Path(base, *parts).is_file():
            return Path(base, *parts)
    pytest.skip(f"shared data {'/'.join(parts)} not found")


def test_read_csv(tmp_path):
    trace = read_trace(write_csv(tmp_path))
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (2, 4, 2)
    assert trace.steps == [[[3, 1], []], [[2, 0], [1, 2]], [[0, 3], [2, 3]]]
    assert trace.phases == ["prefill", "prefill", "decode"]
    assert trace.expert_bytes == [100, 200]
    assert trace.source == "t.route.csv"
    assert trace.weights == [[[0.6, 0.4], []], [[0.5, 0.5], [0.7, 0.3]], [[0.9, 0.1], [0.8, 0.2]]]
    assert trace.guesses is None and trace.lookahead == 0
    decode = trace.decode_only()
    assert decode.steps == [[[0, 3], [2, 3]]] and decode.phases == ["decode"] and len(trace) == 3
    assert decode.weights == [[[0.9, 0.1], [0.8, 0.2]]]


def test_read_real_qwen_trace():
    trace = read_trace(shared_file("data", "routing", "qwen.route.csv"))
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (48, 128, 6)
    assert trace.phases.count("prefill") == 28 and trace.phases.count("decode") == 128
    assert trace.steps[0][0] == [49, 19, 58, 29, 16, 70]
    # Prefill quirk: only the last prompt token has the last layer.
    assert [s[47] == [] for s in trace.steps[:28]] == [True] * 27 + [False]
    assert all(len(layer) == 6 for s in trace.decode_only().steps for layer in s)
    assert set(trace.expert_bytes) == {2654208, 3059712}


@pytest.mark.parametrize("rows, match", [
    (ROWS[:-1] + ["0,1,2,1,1,x,0.2,0,200"], r"t.route.csv:15: expert='x' is not an integer"),
    (ROWS[:-1] + ["0,1,2,1,1,3,0.2"], r"t.route.csv:15: expected 9 columns, got 7"),
    (ROWS[:-1] + ["0,1,2,1,1,4,0.2,0,200"], r"t.route.csv:15: expert=4 is outside 0..3"),
    (ROWS[:-1] + ["0,1,2,2,1,3,0.2,0,200"], r"t.route.csv:15: layer=2 is outside 0..1"),
    (ROWS[:-1] + ["0,1,2,1,0,3,0.2,0,200"], r"t.route.csv:15: duplicate row for step 2 layer 1 slot 0"),
    (ROWS[:-1] + ["0,0,2,1,1,3,0.2,0,200"], r"step 2 appears as both prefill and decode"),
    (ROWS[:-1], r"step 2 layer 1 has only some of its 2 experts"),
    (ROWS[:-1] + ["0,1,2,1,1,3,heavy,0,200"], r"t.route.csv:15: weight='heavy' is not a number"),
])
def test_csv_errors(tmp_path, rows, match):
    with pytest.raises(MoeOffloadError, match=match):
        read_trace(write_csv(tmp_path, rows=rows))


def test_csv_preamble_errors(tmp_path):
    with pytest.raises(MoeOffloadError, match=r"t.route.csv:1: unknown routing trace preamble '# route_trace v2'"):
        read_trace(write_csv(tmp_path, preamble=["# route_trace v2", *PREAMBLE[1:]]))
    with pytest.raises(MoeOffloadError, match="preamble lacks integer n_layer"):
        read_trace(write_csv(tmp_path, preamble=[PREAMBLE[0]]))
    with pytest.raises(MoeOffloadError, match=r"t.route.csv:5: expected the CSV header"):
        read_trace(write_csv(tmp_path, header="turn,phase,step"))
    with pytest.raises(MoeOffloadError, match="unknown routing trace preamble"):
        read_trace(write_csv(tmp_path, preamble=[], header=""))
    with pytest.raises(MoeOffloadError, match="cannot read routing trace"):
        read_trace(tmp_path / "missing.csv")


def test_json_round_trip(tmp_path):
    trace = read_trace(write_csv(tmp_path))
    trace.phases[1] = None  # unknown phases survive too
    out = tmp_path / "trace.jsonl"
    write_trace(trace, out)
    back = read_trace(out)
    assert (back.num_layers, back.num_experts, back.top_k) == (2, 4, 2)
    assert back.steps == trace.steps and back.phases == trace.phases and back.expert_bytes == [100, 200]
    assert back.source == "trace.jsonl"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.route.csv", "trace.jsonl"]  # no temp file left
    write_trace(back, out)  # overwriting is fine
    assert read_trace(out).steps == trace.steps


@pytest.mark.parametrize("lines, match", [
    (['{"format": "something", "version": 1}'], r"x.jsonl:1: bad routing trace header"),
    (['{"format": "moe_offload.route_trace", "version": 1, "num_layers": 2}'], r"x.jsonl:1: bad routing trace"),
    (['{"format": "moe_offload.route_trace", "version": 1, "num_layers": 2, "num_experts": 4, "top_k": 2}',
      '{"phase": "decode", "experts": [[0, 1], [2, 3]]}',
      '{"phase": "decode", "experts": [[0, 1]]}'], r"x.jsonl:3: bad routing step \(expected 2 layers\)"),
    (['{"format": "moe_offload.route_trace", "version": 1, "num_layers": 1, "num_experts": 4, "top_k": 2}',
      '{"phase": "decode", "experts": [[0, 4]]}'], r"x.jsonl:2: .*outside 0..3"),
    (['{"format": "moe_offload.route_trace", "version": 1, "num_layers": 1, "num_experts": 4, "top_k": 2}',
      '{"phase": "decode", "experts": [[0]]}'], r"x.jsonl:2: .*expected 0 or 2 distinct experts"),
    (['{"format": "moe_offload.route_trace", "version": 1, "num_layers": 1, "num_experts": 4, "top_k": 2}',
      '{"phase": "warmup", "experts": [[0, 1]]}'], r"x.jsonl:2: .*phase 'warmup'"),
    (['{"format": "moe_offload.route_trace", "version": 1, "num_layers": 1, "num_experts": 4, "top_k": 2}',
      'not json'], r"x.jsonl:2: bad routing step"),
])
def test_json_errors(tmp_path, lines, match):
    path = tmp_path / "x.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(MoeOffloadError, match=match):
        read_trace(path)


def test_check_matches(tmp_path):
    trace = RoutingTrace(48, 128, 6, [], source="qwen.route.csv")
    check_matches(trace, 48, 128)
    with pytest.raises(MoeOffloadError, match="trace qwen.route.csv has 48 layers x 128 experts but the model "
                                              "has 32 x 8"):
        check_matches(trace, 32, 8)


def test_recorder_splits_forward_passes():
    rec = TraceRecorder(num_layers=2, num_experts=8, top_k=2)
    rec.record(0, [[1, 2], [3, 4], [5, 6]])  # 3-token prompt
    rec.record(1, [[0, 1], [2, 3], [4, 5]])
    for layer0, layer1 in [([7, 0], [1, 0]), ([2, 5], [6, 3])]:  # two decode tokens
        rec.record(0, [layer0])
        rec.record(1, [layer1])
    trace = rec.trace()
    assert trace.steps == [[[1, 2], [0, 1]], [[3, 4], [2, 3]], [[5, 6], [4, 5]],
                           [[7, 0], [1, 0]], [[2, 5], [6, 3]]]
    assert trace.phases == ["prefill"] * 3 + ["decode"] * 2
    rec.phase = "prefill"  # e.g. a second chat turn's prompt, fed one token at a time
    rec.record(0, [[1, 3]])
    rec.record(1, [[2, 4]])
    assert rec.trace().phases[-1] == "prefill" and len(rec.trace()) == 6


def test_recorder_single_token_prompt_is_prefill():
    rec = TraceRecorder(1, 4, 1)
    for e in (0, 1, 2):
        rec.record(0, [[e]])
    assert rec.trace().phases == ["prefill", "decode", "decode"]


V2 = ('{"format": "moe_offload.route_trace", "version": 2, "num_layers": 3, "num_experts": 4, "top_k": 2, '
      '"weights": true, "lookahead": 2}')
STEP = {"phase": "decode", "experts": [[0, 1], [2, 3], [1, 2]], "weights": [[0.5, 0.5], [0.7, 0.3], [0.6, 0.4]],
        "guesses": [[[], [2, 1], [1, 0]], [[], [], [3, 2]]]}


def with_step(**changes) -> str:
    import json

    return json.dumps({**STEP, **changes})


def test_v2_round_trip_with_weights_and_guesses(tmp_path):
    trace = RoutingTrace(3, 4, 2, [STEP["experts"], [[3, 2], [0, 1], []]], ["prefill", "decode"], "mine",
                         weights=[STEP["weights"], [[0.9, 0.1], [0.123456789, 0.876543211], []]],
                         guesses=[STEP["guesses"], [[[], [0, 1], []], [[], [], []]]])
    assert trace.lookahead == 2
    out = tmp_path / "v2.jsonl"
    write_trace(trace, out)
    back = read_trace(out)
    assert back.steps == trace.steps and back.guesses == trace.guesses and back.lookahead == 2
    assert back.weights[1][1] == [0.12346, 0.87654]  # 5 decimals on disk
    assert back.select([1]).guesses == [trace.guesses[1]] and back.decode_only().weights == [back.weights[1]]


def test_reads_version_1(tmp_path):
    path = tmp_path / "v1.jsonl"
    path.write_text('{"format": "moe_offload.route_trace", "version": 1, "num_layers": 1, "num_experts": 4, '
                    '"top_k": 2}\n{"phase": "decode", "experts": [[0, 3]]}\n')
    trace = read_trace(path)
    assert trace.steps == [[[0, 3]]] and trace.weights is None and trace.guesses is None


@pytest.mark.parametrize("line, match", [
    (with_step(weights=[[0.5, 0.5], [0.7], [0.6, 0.4]]), "weights must match experts"),
    (with_step(weights=[[0.5, 0.5], [0.7, "x"], [0.6, 0.4]]), "weights must be numbers"),
    (with_step(guesses=[[[], [2, 1], [1, 0]]]), "expected guesses for 2 layers ahead"),
    (with_step(guesses=[[[], [2, 7], [1, 0]], [[], [], []]]), r"expert ids \[2, 7\] outside 0..3"),
    (with_step(guesses=[[[], [2, 2], [1, 0]], [[], [], []]]), "distinct experts"),
    ('{"phase": "decode", "experts": [[0, 1], [2, 3], [1, 2]]}', "no 'weights' field"),
])
def test_v2_errors(tmp_path, line, match):
    path = tmp_path / "x.jsonl"
    path.write_text(V2 + "\n" + line + "\n")
    with pytest.raises(MoeOffloadError, match=r"x.jsonl:2: bad routing step.*" + match):
        read_trace(path)


def test_unknown_version(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(V2.replace('"version": 2', '"version": 3') + "\n")
    with pytest.raises(MoeOffloadError, match="x.jsonl:1: bad routing trace header.*version 1 or 2"):
        read_trace(path)


def test_recorder_weights_and_guesses():
    rec = TraceRecorder(num_layers=3, num_experts=8, top_k=2, lookahead=2)
    rec.record(0, [[1, 2], [3, 4]], [[0.6, 0.4], [0.5, 0.5]], {1: [[5, 6], [7, 0]], 2: [[1, 3], [2, 4]]})
    rec.record(1, [[5, 7], [0, 1]], [[0.9, 0.1], [0.8, 0.2]], {1: [[1, 2], [2, 3]]})
    rec.record(2, [[1, 2], [2, 4]], [[0.7, 0.3], [0.6, 0.4]], {})
    rec.record(0, [[6, 7]], [[0.5, 0.5]], {1: [[0, 1]], 2: [[2, 3]]})  # a decode token
    trace = rec.trace()
    assert trace.steps[1] == [[3, 4], [0, 1], [2, 4]] and trace.steps[2] == [[6, 7], [], []]
    assert trace.weights[0] == [[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]]
    # guesses[token][d - 1][target layer]: made d layers before the target
    assert trace.guesses[0] == [[[], [5, 6], [1, 2]], [[], [], [1, 3]]]
    assert trace.guesses[1] == [[[], [7, 0], [2, 3]], [[], [], [2, 4]]]
    assert trace.guesses[2] == [[[], [0, 1], []], [[], [], [2, 3]]]
    assert trace.phases == ["prefill", "prefill", "decode"]


def test_recorder_without_weights_keeps_none():
    rec = TraceRecorder(1, 4, 1)
    rec.record(0, [[1]], [[1.0]])
    rec.record(0, [[2]])
    trace = rec.trace()
    assert trace.weights is None and trace.guesses is None
