"""CPU layers served without the host (offload/served.py, cpu_hqq.c's layer server): the protocol on a CPU device
(this thread plays the GPU stream), and on CUDA inside graphed decode steps."""

import pytest
import torch
from typer.testing import CliRunner

import moe_offload
from moe_offload.cli import app
from moe_offload.errors import MoeOffloadError
from moe_offload.kernels import cpu as cpu_kernels
from moe_offload.offload.hybrid import CostModel
from moe_offload.offload.served import choose_cpu_share
from moe_offload.placement import OffloadOptions

needs_int8 = pytest.mark.skipif(not cpu_kernels.available() or not cpu_kernels.int8_available(),
                                reason="no integer CPU path")
PROMPT = list(range(3, 30))
ONE_EACH = CostModel(copy_ms=1.0, cpu_ms=0.9, smoothing=0.0)  # one expert on the CPU, one copied


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """Four layers with dims the fused integer CPU kernel takes (multiples of 256)."""
    from conftest import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("served") / "m", hidden_size=256, intermediate_size=512,
                           num_hidden_layers=4)


def load(directory, device="cpu", dtype="float32", preset="4/2", **offload):
    return moe_offload.load(directory, device=device, dtype=dtype, quantize=preset, offload=OffloadOptions(**offload))


def within_tolerance(errors, tol=3e-2):
    """The CPU's int8 rounding now and then flips a later layer's routing on these random models (a step off by 20-35%
    and a few after it, through the KV cache, on some hosts' SIMD widths): the typical step within ``tol``, none wild
    (wrong experts or stale slots give errors near 100%)."""
    return sorted(errors)[len(errors) // 2] < tol and max(errors) < 0.5


def teacher_forced(engine, reference, steps=10):
    """Relative logit errors of ``engine`` against ``reference`` over the reference's greedy tokens, and the tokens."""
    ref_session, session = reference.new_session(), engine.new_session()
    want, _ = ref_session.prefill(PROMPT)
    got, _ = session.prefill(PROMPT)
    errors, tokens = [], []
    for _ in range(steps):
        token = int(want.argmax())
        tokens.append(token)
        want, got = ref_session.step(token), session.step(token)
        errors.append(float((got.float() - want.float()).norm() / want.float().norm()))
    return errors, tokens


@pytest.mark.parametrize("cpu_call, copy, max_gpu, want", [
    (0.9, 1.0, 1, 1),  # one each: both paths busy
    (0.3, 1.0, 1, 2),  # the CPU does both sooner than one copy
    (3.0, 1.0, 1, 1),  # two copies would be sooner, but only one scratch slot per parity
    (3.0, 1.0, 2, 0),
    (0.9, 1.0, 0, 2),  # no copies at all (a CPU layer without copy sharing)
])
def test_the_cpu_share_is_the_split_that_finishes_first(cpu_call, copy, max_gpu, want):
    assert choose_cpu_share(2, lambda c: cpu_call * c, copy, max_gpu) == want


@needs_int8
@pytest.mark.parametrize("preset", ["4/2", "4/2-lean"])
def test_served_cpu_layers_match_resident_and_count_their_work(wide_dir, preset):
    """Three served CPU layers (one expert each on the CPU, one copied; guesses copied ahead) stay within the CPU path's
    tolerance of the resident model; the statistics fold in what the server did."""
    resident = load(wide_dir, preset=preset)
    engine = load(wide_dir, preset=preset, cpu_layers=3, serve_cpu_layers="on", hybrid_cost=ONE_EACH,
                  cpu_layer_copies=True)
    served = engine.hybrid.served
    assert served is not None and served.cpu_k == 1 and served.layers == engine.plan.cpu_layer_ids == [0, 1, 2]
    assert all((b.experts.served is not None) == (i in served.layers) for i, b in enumerate(engine.model.moe_blocks()))
    steps = 10
    errors, _ = teacher_forced(engine, resident, steps)
    assert within_tolerance(errors), " ".join(f"{e:.4f}" for e in errors)
    engine.expert_cache.collect_timing()
    layers = engine.cache_stats.layers
    counters = served.decode_counters()
    assert [layers[i].cpu_experts for i in served.layers] == [steps] * 3
    assert counters["errors"] == 0
    assert counters["guesses"] == 2 * steps  # layers 0 and 1 guess for the next; the last CPU layer guesses nothing
    assert 0 < counters["guess_hits"] <= counters["guesses"]  # the routing follows the hidden state
    # every CPU layer's GPU share is one expert: copied now, or ahead on a right guess; plus every guess's copy
    assert counters["copies"] == 3 * steps - counters["guess_hits"] + counters["guesses"]
    engine.hybrid.close()
    assert not served.server.running


@needs_int8
def test_a_single_served_cpu_layer_uses_one_set_of_slots(wide_dir):
    """One CPU layer has no next one to guess for: one set of scratch slots (two sets made the server refuse)."""
    resident = load(wide_dir)
    engine = load(wide_dir, cpu_layers=1, serve_cpu_layers="on", hybrid_cost=ONE_EACH, cpu_layer_copies=True)
    served = engine.hybrid.served
    assert served.layers == [0] and served.cpu_k == 1 and served.sets == 1
    errors, _ = teacher_forced(engine, resident, steps=6)
    assert within_tolerance(errors), " ".join(f"{e:.4f}" for e in errors)
    engine.hybrid.close()


@needs_int8
def test_served_cpu_layers_survive_a_second_prefill(wide_dir):
    """A second prompt after a served decode: its prefill streams the CPU layers' experts through the scratch slots
    the server wrote into, and must not trust what it had staged there before (ExpertCache.forget_staged)."""
    resident = load(wide_dir)
    engine = load(wide_dir, cpu_layers=3, serve_cpu_layers="on", hybrid_cost=ONE_EACH, cpu_layer_copies=True)
    assert engine.expert_cache.scratch_shared
    first, _ = teacher_forced(engine, resident, steps=6)
    second, _ = teacher_forced(engine, resident, steps=6)
    assert within_tolerance(first) and second == pytest.approx(first, abs=1e-6), (first, second)


@needs_int8
def test_served_cpu_layers_without_copies_compute_every_expert_on_the_cpu(wide_dir):
    resident = load(wide_dir)
    engine = load(wide_dir, cpu_layers=2, serve_cpu_layers="on", hybrid_cost=ONE_EACH, cpu_layer_copies=False)
    served = engine.hybrid.served
    assert served.cpu_k == served.top_k == 2 and served.gpu_k == 0
    errors, _ = teacher_forced(engine, resident, steps=6)
    assert within_tolerance(errors), " ".join(f"{e:.4f}" for e in errors)
    engine.expert_cache.collect_timing()
    assert served.decode_counters()["copies"] == 0


def test_served_layers_without_a_fused_cpu_kernel_stream_their_experts(tiny_dir):
    """Experts the fused CPU kernel does not take (here: dims under 128) are still served where copies are on: the
    server only copies each layer's top-k into one set of scratch slots (cpu_k 0, no guesses), and the GPU side
    computes them all, so outputs equal the resident model's up to the order of the weighted sum."""
    resident = load(tiny_dir)
    engine = load(tiny_dir, cpu_layers=1, serve_cpu_layers="on", hybrid_cost=ONE_EACH, cpu_layer_copies=True)
    served = engine.hybrid.served
    assert served is not None and served.cpu_k == 0 and served.sets == 1 and not served.guess_routers
    steps = 6
    errors, _ = teacher_forced(engine, resident, steps)
    assert max(errors) < 1e-5, errors
    engine.expert_cache.collect_timing()
    counters = served.decode_counters()
    assert counters["copies"] == steps * engine.config.top_k and counters["guesses"] == 0
    assert engine.cache_stats.layers[served.layers[0]].cpu_experts == 0


def test_serve_on_says_why_it_cannot_run(tiny_dir, wide_dir):
    with pytest.raises(MoeOffloadError, match="--serve-cpu-layers on cannot run: there are no CPU layers"):
        load(wide_dir, offload_per_layer=2, serve_cpu_layers="on")
    with pytest.raises(MoeOffloadError, match="do not take the fused integer kernel"):  # tiny dims, all on the CPU
        load(tiny_dir, cpu_layers=1, serve_cpu_layers="on", cpu_layer_copies=False)
    with pytest.raises(MoeOffloadError, match="--serve-cpu-layers 'maybe' is not one of off, auto, on"):
        load(wide_dir, cpu_layers=1, serve_cpu_layers="maybe")
    assert load(wide_dir, cpu_layers=1).hybrid.served is None  # auto: CUDA only


def test_cli_rejects_an_unknown_serve_mode(wide_dir):
    result = CliRunner().invoke(app, ["generate", str(wide_dir), "-p", "Hi", "--device", "cpu", "--cpu-layers", "1",
                                      "--quantize", "4/2", "--serve-cpu-layers", "maybe"])
    assert result.exit_code == 1
    assert "--serve-cpu-layers 'maybe' is not one of off, auto, on" in result.output
    assert "Traceback" not in result.output


# -- CUDA: the served layers inside graphed decode steps -----------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@needs_int8
@pytest.mark.parametrize("dtype, preset", [("bfloat16", "4/2"), ("float16", "4/2"), ("bfloat16", "4/2-lean")])
def test_cuda_served_decode_is_one_graph_and_matches_copies_only(wide_dir, dtype, preset):
    from moe_offload.graphs import GraphedDecode
    from moe_offload.kernels import host_signal

    if not host_signal.available():
        pytest.skip("no stream memory operations")
    reference = load(wide_dir, device="cuda", dtype=dtype, preset=preset, offload_per_layer=2, hybrid="off")
    engine = load(wide_dir, device="cuda", dtype=dtype, preset=preset, cpu_layers=3, hybrid_cost=ONE_EACH)  # serve: auto
    served = engine.hybrid.served
    assert served is not None and served.cpu_k == 1
    session = engine.new_session()
    session.prefill(PROMPT)
    assert isinstance(session.decoder, GraphedDecode)
    assert session.decoder.host_layers == [] and len(session.decoder.graphs) == 1  # no layer reaches the host
    assert served._settling == 0  # the capture's two warm-up passes waited on the host; replays never do
    errors, _ = teacher_forced(engine, reference, steps=12)
    # three of the four layers with an int8-rounded CPU expert each (one or two percent apiece on this random model)
    assert within_tolerance(errors, 5e-2), " ".join(f"{e:.4f}" for e in errors)
    engine.expert_cache.collect_timing()
    counters = served.decode_counters()
    assert counters["errors"] == 0 and counters["guesses"] > 0
    # 12 steps, and the graph capture's two warm-up steps per session (each session captures its own graphs)
    assert [engine.cache_stats.layers[i].cpu_experts for i in served.layers] == [12 + 2 * 2] * 3
    host = load(wide_dir, device="cuda", dtype=dtype, preset=preset, cpu_layers=3, hybrid_cost=ONE_EACH,
                serve_cpu_layers="off")
    assert host.hybrid.served is None
    errors, _ = teacher_forced(engine, host, steps=12)
    assert within_tolerance(errors, 5e-2), " ".join(f"{e:.4f}" for e in errors)
    engine.hybrid.close()


@needs_cuda
@needs_int8
def test_cuda_float32_is_not_served(wide_dir):
    """float32 on CUDA has no grouped kernels: auto falls back to the host-synced CPU layers, on says why."""
    assert load(wide_dir, device="cuda", cpu_layers=3).hybrid.served is None
    with pytest.raises(MoeOffloadError, match="grouped expert kernels do not run these experts"):
        load(wide_dir, device="cuda", cpu_layers=3, serve_cpu_layers="on")


@needs_cuda
def test_cuda_streamed_layers_match_resident(wide_dir):
    """4/3 experts (no fused CPU kernel): served layers only copy (cpu_k 0), inside one graph; the GPU computes every
    expert with the resident path's kernels and sum, so the logits match the resident model's."""
    from moe_offload.kernels import host_signal

    if not host_signal.available():
        pytest.skip("no stream memory operations")

    def load43(**offload):
        return moe_offload.load(wide_dir, device="cuda", dtype="bfloat16", quantize="4/3",
                                offload=OffloadOptions(**offload) if offload else None)

    resident = load43()
    assert load43(cpu_layers=3, hybrid="on", serve_cpu_layers="off").hybrid.served is None
    engine = load43(cpu_layers=3, hybrid="on")  # auto serves them too
    served = engine.hybrid.served
    assert served is not None and served.cpu_k == 0 and served.sets == 1
    errors, _ = teacher_forced(engine, resident, steps=10)
    assert max(errors) < 1e-3, errors
    engine.hybrid.close()


@needs_cuda
def test_cuda_the_server_stream_is_no_pool_stream_and_survives_many_streams(wide_dir, monkeypatch):
    """The server's copies release the stream that waits for them, so they must never be queued on it: PyTorch's pool
    hands its streams out in turn, and a graph capture's stream drawn later could be the server's own (a deadlock
    seen with Mixtral 4/3 streamed at ~2.5 GB). The server's stream is its own; decode after many draws still runs.
    Too few hardware queues: not served, with the reason."""
    from moe_offload.kernels import host_signal

    if not host_signal.available():
        pytest.skip("no stream memory operations")
    resident = moe_offload.load(wide_dir, device="cuda", dtype="bfloat16", quantize="4/3")
    engine = moe_offload.load(wide_dir, device="cuda", dtype="bfloat16", quantize="4/3",
                              offload=OffloadOptions(cpu_layers=3, hybrid="on", serve_cpu_layers="on"))
    served = engine.hybrid.served
    assert served is not None
    pool = {torch.cuda.Stream().cuda_stream for _ in range(96)}
    assert served.stream.cuda_stream not in pool | {torch.cuda.current_stream().cuda_stream}
    errors, _ = teacher_forced(engine, resident, steps=4)
    assert max(errors) < 1e-3, errors
    engine.hybrid.close()
    monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    with pytest.raises(MoeOffloadError, match="CUDA_DEVICE_MAX_CONNECTIONS=1"):
        moe_offload.load(wide_dir, device="cuda", dtype="bfloat16", quantize="4/3",
                         offload=OffloadOptions(cpu_layers=3, hybrid="on", serve_cpu_layers="on"))
