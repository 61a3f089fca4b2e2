"""The hybrid CPU path: the split decision, and outputs equal to the copy-only path within tolerance.

On CPU the "device" is host memory too, so the whole path (worker thread, CPU kernel, late combination)
runs here; a fixed cost model forces misses onto the CPU. The GPU run is in test_offloading_cuda.py."""

import json

import pytest
import torch
from typer.testing import CliRunner

import moe_offload
from moe_offload.cli import app
from moe_offload.errors import MoeOffloadError
from moe_offload.grouped import SlotKernel
from moe_offload.kernels import cpu as cpu_kernels
from moe_offload.offload.hybrid import CostModel, SplitShape, plan_split, split_misses
from moe_offload.offload.snapshot import snapshot
from moe_offload.placement import OffloadOptions

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler for the CPU kernel")

ALL_CPU = CostModel(copy_ms=10.0, cpu_ms=0.1, smoothing=0.0)
PROMPT = "Mixture of experts route tokens"


# -- the decision -----------------------------------------------------------------------------------
def test_split_all_copy_when_cpu_is_slow():
    assert split_misses([1, 5], CostModel(copy_ms=1.0, cpu_ms=5.0)) == ([1, 5], [])


def test_split_all_cpu_when_copies_are_slow():
    assert split_misses([1, 5], CostModel(copy_ms=5.0, cpu_ms=1.0)) == ([], [1, 5])


def test_split_balances_two_misses():
    # one copy (1.3) and one CPU expert (1.9) both finish by 1.9; two copies would take 2.6
    assert split_misses([3, 6], CostModel(copy_ms=1.3, cpu_ms=1.9)) == ([3], [6])


def test_split_tie_copies():
    assert split_misses([2], CostModel(copy_ms=1.0, cpu_ms=1.0)) == ([2], [])


def test_split_counts_the_copy_backlog():
    cost = CostModel(copy_ms=1.3, cpu_ms=1.9)
    assert split_misses([4], cost, copy_backlog_ms=0.0) == ([4], [])
    assert split_misses([4], cost, copy_backlog_ms=0.7) == ([], [4])  # 0.7 + 1.3 > 1.9


def test_split_many_misses_spreads_by_finish_time():
    to_copy, to_cpu = split_misses(list(range(8)), CostModel(copy_ms=1.0, cpu_ms=3.0))
    assert len(to_copy) == 6 and len(to_cpu) == 2  # copies finish at 6, the CPU at 6


# An expert of 3 parts of 1000 bytes (gate, up, down); gate and up have 100 hidden units of 10 bytes each.
SHAPE = SplitShape(units=100, quantum=10, ranges=lambda head: [(0, 3000 - 20 * head)], head_bytes=20, expert_bytes=3000)


def test_split_balances_one_miss_between_the_paths():
    # CPU and copy equally fast: the CPU takes 3/4 of gate+up (half the expert), the copy the other half.
    head, finish = plan_split(1, CostModel(copy_ms=1.0, cpu_ms=1.0), SHAPE)
    assert head == 80 and finish == pytest.approx(max(1.0 * 80 * 20 / 3000, 1.0 - 80 * 20 / 3000))
    assert finish < 0.6  # against 1.0 for either path alone


def test_split_gives_the_cpu_all_of_gate_and_up_at_most():
    head, finish = plan_split(2, CostModel(copy_ms=10.0, cpu_ms=0.1), SHAPE)
    assert head == 100 and finish == pytest.approx(2 * 10.0 / 3)  # the copy still brings down


def test_no_split_when_the_cpu_is_far_slower():
    assert plan_split(1, CostModel(copy_ms=1.0, cpu_ms=100.0), SHAPE) == (0, 1.0)


def test_split_within_experts_counts_the_copy_backlog():
    idle, _ = plan_split(1, CostModel(copy_ms=1.0, cpu_ms=1.0), SHAPE)
    busy, _ = plan_split(1, CostModel(copy_ms=1.0, cpu_ms=1.0), SHAPE, copy_backlog_ms=0.5)
    assert busy > idle  # a busy link leaves more of the expert to the CPU


def test_cpu_cost_fits_a_fixed_cost_per_call_and_a_rate():
    cost = CostModel(copy_ms=1.0, cpu_ms=2.0, smoothing=0.2)
    for i in range(200):  # whole experts and split heads: calls of 1, 0.5 and 2 experts' worth
        units = (1.0, 0.5, 2.0)[i % 3]
        cost.observe_cpu(0.3 + 0.9 * units, units)
    assert cost.cpu_fixed_ms == pytest.approx(0.3, abs=1e-6) and cost.cpu_ms == pytest.approx(0.9, abs=1e-6)
    assert cost.cpu_call_ms(2) == pytest.approx(2.1) and cost.cpu_call_ms(0) == 0.0


def test_one_call_size_fits_the_rate_only():
    cost = CostModel(copy_ms=1.0, cpu_ms=2.0, smoothing=0.5, cpu_fixed_ms=0.2)
    for _ in range(50):
        cost.observe_cpu(1.4, 1.0)
    assert cost.cpu_fixed_ms == 0.2 and cost.cpu_ms == pytest.approx(1.2)


def test_fixed_cpu_cost_gives_the_cpu_less():
    free, _ = plan_split(1, CostModel(copy_ms=1.0, cpu_ms=1.0), SHAPE)
    taxed, finish = plan_split(1, CostModel(copy_ms=1.0, cpu_ms=1.0, cpu_fixed_ms=0.2), SHAPE)
    assert 0 < taxed < free and finish > 0.2
    assert plan_split(1, CostModel(copy_ms=1.0, cpu_ms=1.0, cpu_fixed_ms=1.0), SHAPE)[0] == 0  # never pays


def test_split_misses_counts_the_fixed_cost_once():
    # the first CPU expert pays for the call (0.5 + 0.4 < 1.0), a second adds only its rate (1.3 < 2.0 copying both)
    assert split_misses([1, 2, 3], CostModel(copy_ms=1.0, cpu_ms=0.4, cpu_fixed_ms=0.5)) == ([2], [1, 3])
    assert split_misses([1], CostModel(copy_ms=1.0, cpu_ms=0.6, cpu_fixed_ms=0.5)) == ([1], [])  # 1.1 > 1.0


def test_no_misses_no_split():
    assert plan_split(0, CostModel(copy_ms=1.0, cpu_ms=1.0), SHAPE) == (0, 0.0)


# -- end to end on the CPU ------------------------------------------------------------------------
def load(directory, **offload):
    return moe_offload.load(directory, device="cpu", dtype="float32", quantize="4/2",
                            offload=OffloadOptions(offload_per_layer=2, **offload))


def decode_logits(engine, n=12):
    """Greedy tokens and the logits of every decode step."""
    completion = engine.generate(PROMPT, max_new_tokens=n, ignore_eos=True)
    prompt = engine.encode(PROMPT)
    ids = prompt + completion.tokens
    kv = engine.model.new_kv_cache(64)
    logits = [engine.model(torch.tensor([prompt]), kv, 0)[0, -1]]
    for i in range(len(prompt), len(ids) - 1):  # one token at a time: the decode path
        logits.append(engine.model(torch.tensor([[ids[i]]]), kv, i)[0, -1])
    return completion.tokens, torch.stack(logits)


@pytest.fixture(scope="module")
def copy_only(tiny_dir):
    return decode_logits(load(tiny_dir, hybrid="off"))


def test_hybrid_matches_copy_only_within_tolerance(tiny_dir, copy_only):
    engine = load(tiny_dir, hybrid="on", hybrid_cost=ALL_CPU)
    tokens, logits = decode_logits(engine)
    assert tokens == copy_only[0]
    # The 4/2 experts' CPU path rounds its inputs to int8 per group of 16 (kernels/cpu.py): about 1% here,
    # where float32 activations would agree to 1e-4 (tests/kernels/test_cpu.py bounds both paths).
    err = (logits - copy_only[1]).norm() / copy_only[1].norm()
    assert err < 2e-2, f"relative logit error {err:.2e}"
    s = engine.cache_stats.summary()
    assert s["cpu_experts"] > 0 and s["cpu_ms_per_token"] > 0


def test_cpu_experts_are_not_cached_and_not_copied(tiny_dir):
    engine = load(tiny_dir, hybrid="on", hybrid_cost=ALL_CPU, prefetch=0)
    engine.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    total = engine.cache_stats.total()
    layout_bytes = engine.expert_cache.store.layout.nbytes
    # every miss is either copied (bytes) or computed on the CPU (no bytes); nothing else moves
    assert total.bytes_copied == (total.misses - total.cpu_experts) * layout_bytes
    assert total.cpu_experts > 0
    # the live expert view (server page) shows the last step's CPU experts, none of which sits in a slot
    recent = engine.expert_cache.cpu_recent
    assert recent and not recent & engine.expert_cache.policy.resident()
    view = snapshot(engine.expert_cache)
    assert {key for key in recent if view.state(*key) == "p"} == recent


# Copies twice as slow as the CPU: a lone miss or two are split, not given whole to either path.
SPLITS = CostModel(copy_ms=1.0, cpu_ms=0.5, smoothing=0.0)


def test_split_experts_match_copy_only_within_tolerance(tiny_dir, copy_only):
    engine = load(tiny_dir, hybrid="on", hybrid_cost=SPLITS, split=True)
    assert engine.hybrid.split is not None
    tokens, logits = decode_logits(engine)
    assert tokens == copy_only[0]
    err = (logits - copy_only[1]).norm() / copy_only[1].norm()
    assert err < 2e-2, f"relative logit error {err:.2e}"
    s = engine.cache_stats.summary()
    assert s["split_experts_per_token"] > 0 and s["cpu_ms_per_token"] > 0


def test_split_experts_copy_part_of_an_expert_and_evict_nothing(tiny_dir):
    engine = load(tiny_dir, hybrid="on", hybrid_cost=SPLITS, prefetch=0, split=True)
    cache = engine.expert_cache
    ids = engine.encode(PROMPT)
    kv = engine.model.new_kv_cache(64)
    engine.model(torch.tensor([ids]), kv, 0)  # prefill: no CPU path
    resident, before = set(cache.policy.resident()), cache.stats.total()
    for i in range(6):  # decode steps
        engine.model(torch.tensor([[ids[i]]]), kv, len(ids) + i)
    after = cache.stats.total()
    split = after.split_experts - before.split_experts
    whole = (after.misses - before.misses) - split - (after.cpu_experts - before.cpu_experts)
    B = cache.store.layout.nbytes
    moved = after.bytes_copied - before.bytes_copied
    assert split > 0
    assert whole * B < moved < (whole + split) * B  # a split expert moves only part of its buffer
    if whole == 0:  # split experts go through scratch slots: the cache keeps what it had
        assert set(cache.policy.resident()) == resident


def test_split_is_off_by_default(tiny_dir):
    engine = load(tiny_dir, hybrid="on", hybrid_cost=SPLITS)
    assert engine.hybrid.split is None
    engine.generate(PROMPT, max_new_tokens=6, ignore_eos=True)
    assert engine.cache_stats.total().split_experts == 0


def test_off_is_bit_exact(tiny_dir):
    exact = load(tiny_dir, hybrid="off").generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    resident = moe_offload.load(tiny_dir, device="cpu", dtype="float32", quantize="4/2").generate(
        PROMPT, max_new_tokens=8, ignore_eos=True)
    assert exact.tokens == resident.tokens


def test_auto_is_off_without_cuda(tiny_dir):
    assert load(tiny_dir, hybrid="auto").hybrid is None


def test_calibrated_cost_model_is_positive(tiny_dir):
    engine = load(tiny_dir, hybrid="on", cpu_threads=1)
    assert engine.hybrid is not None and engine.hybrid.threads == 1
    assert engine.hybrid.cost.copy_ms > 0 and engine.hybrid.cost.cpu_ms > 0


@pytest.mark.parametrize("options, message", [
    (dict(hybrid="sometimes"), "--hybrid 'sometimes' is not one of off, auto, on"),
    (dict(hybrid="on", cpu_threads=0), "--cpu-threads 0 must be >= 1"),
])
def test_bad_options(tiny_dir, options, message):
    with pytest.raises(MoeOffloadError, match=message):
        load(tiny_dir, **options)


def test_no_cpu_kernel_is_a_clear_error(tiny_dir, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "unavailable_reason", lambda: "no C compiler found")
    with pytest.raises(MoeOffloadError, match="--hybrid on: the CPU expert path cannot run: no C compiler found"):
        load(tiny_dir, hybrid="on")


def test_cli_generate_json_reports_cpu_experts(tiny_dir):
    result = CliRunner().invoke(app, ["generate", str(tiny_dir), "-p", "Hello", "--temperature", "0",
                                      "--max-new-tokens", "4", "--device", "cpu", "--quantize", "4/2",
                                      "--offload-per-layer", "2", "--hybrid", "on", "--cpu-threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["cpu_experts_per_token"] >= 0  # calibrated on CPU: a memcpy usually beats the kernel


def test_cli_bad_hybrid_value(tiny_dir):
    result = CliRunner().invoke(app, ["generate", str(tiny_dir), "-p", "Hi", "--device", "cpu",
                                      "--offload-per-layer", "2", "--hybrid", "maybe"])
    assert result.exit_code == 1
    assert "--hybrid 'maybe' is not one of off, auto, on" in result.output


# -- CPU layers (--cpu-layers): every expert of those layers computed on the CPU at decode -------------------
def load_cpu_layers(directory, n, **offload):
    return moe_offload.load(directory, device="cpu", dtype="float32", quantize="4/2",
                            offload=OffloadOptions(cpu_layers=n, **offload))


def decode_after_prefill(engine, steps):
    """Prefill PROMPT, reset the statistics, then ``steps`` greedy decode steps: the statistics are decode's."""
    session = engine.new_session()
    token = int(session.prefill(engine.encode(PROMPT))[0].argmax())
    engine.cache_stats.reset()
    for _ in range(steps):
        token = int(session.step(token).argmax())


@pytest.fixture(scope="module")
def resident(tiny_dir):
    return decode_logits(moe_offload.load(tiny_dir, device="cpu", dtype="float32", quantize="4/2"))


@pytest.mark.parametrize("n, inline", [(1, True), (2, True), (2, False)])
def test_cpu_layers_match_resident_within_tolerance(tiny_dir, resident, n, inline):
    engine = load_cpu_layers(tiny_dir, n, cpu_layers_inline=inline)
    assert engine.hybrid.inline_cpu_layers == inline
    assert engine.plan.cpu_layers == n and engine.hybrid is not None
    tokens, logits = decode_logits(engine)
    assert tokens == resident[0]
    err = (logits - resident[1]).norm() / resident[1].norm()
    assert err < 2e-2, f"relative logit error {err:.2e}"


@pytest.mark.parametrize("cost", [CostModel(copy_ms=0.1, cpu_ms=10.0, smoothing=0.0),  # copies would be faster
                                  CostModel(copy_ms=10.0, cpu_ms=0.1, smoothing=0.0)])
def test_cpu_layers_compute_every_decode_expert_there_and_copy_nothing(tiny_dir, cost):
    """Without copy sharing (or where the CPU is faster anyway) a CPU layer computes all of its decode experts."""
    engine = load_cpu_layers(tiny_dir, 1, hybrid="on", hybrid_cost=cost, cpu_layer_copies=cost.cpu_ms < cost.copy_ms)
    cpu_layer = engine.plan.cpu_layer_ids[0]
    assert engine.plan.layer_slots[cpu_layer] == 0
    steps = 6
    decode_after_prefill(engine, steps)  # (prefill streams the CPU layer's experts through the scratch slots)
    layers = engine.cache_stats.layers
    top_k = engine.config.top_k
    assert layers[cpu_layer].cpu_experts == steps * top_k == layers[cpu_layer].misses
    # the other layer holds all its experts (no budget): every use a hit, and the copy path's costs do not
    # send its experts to the CPU (choose only sees misses)
    others = [s for l, s in enumerate(layers) if l != cpu_layer]
    assert all(s.cpu_experts == 0 and s.misses == 0 and s.hits == steps * top_k for s in others)
    assert sum(s.bytes_copied for s in layers) == 0


@pytest.mark.parametrize("copy_ms, cpu_ms, on_cpu", [(1.0, 0.9, 1), (1.0, 0.4, 2), (0.3, 1.0, 0)])
def test_cpu_layers_share_their_experts_with_the_copy_link(tiny_dir, resident, copy_ms, cpu_ms, on_cpu):
    """Each decode step a CPU layer gives the CPU what split_misses gives it and copies the rest into a scratch slot for the GPU; outputs stay within the hybrid path's tolerance."""
    cost = CostModel(copy_ms=copy_ms, cpu_ms=cpu_ms, smoothing=0.0)
    engine = load_cpu_layers(tiny_dir, 1, hybrid_cost=cost, cpu_layer_copies=True)  # (a CUDA device's default)
    cpu_layer, top_k = engine.plan.cpu_layer_ids[0], engine.config.top_k
    assert engine.expert_cache.scratch_slots >= top_k - on_cpu
    steps = 6
    decode_after_prefill(engine, steps)
    s = engine.cache_stats.layers[cpu_layer]
    assert s.cpu_experts == steps * on_cpu and s.misses == steps * top_k
    assert s.bytes_copied == steps * (top_k - on_cpu) * engine.expert_cache.store.layout.nbytes
    assert s.bypass == steps * (top_k - on_cpu)  # through the scratch slots: no cache slot, nothing evicted
    tokens, logits = decode_logits(load_cpu_layers(tiny_dir, 1, hybrid_cost=cost, cpu_layer_copies=True))
    assert tokens == resident[0]
    err = (logits - resident[1]).norm() / resident[1].norm()
    assert err < 2e-2, f"relative logit error {err:.2e}"


def test_a_cpu_layer_stages_its_guess_for_the_next_one(tiny_dir, resident):
    """Layer 0 copies its guess of CPU layer 1's first expert ahead; layer 1 gives a staged expert to the GPU and splits
    the rest (here: the CPU's, a copy would finish later), and copies again only where the guess was wrong."""
    cost = CostModel(copy_ms=1.0, cpu_ms=0.9, smoothing=0.0)
    engine = load_cpu_layers(tiny_dir, 2, hybrid_cost=cost, cpu_layer_copies=True, stage_cpu_guess=True)
    assert engine.plan.cpu_layer_ids == [0, 1]
    steps = 8
    decode_after_prefill(engine, steps)
    first, second = engine.cache_stats.layers
    nbytes = engine.expert_cache.store.layout.nbytes
    assert first.guessed == 0 and first.cpu_experts == steps  # no CPU layer before it in a step: nothing staged
    assert second.guessed == steps and second.cpu_experts == steps
    right = second.needed_guessed
    assert 0 < right <= steps  # a tiny random model's routing still follows its hidden state
    assert second.bytes_copied == (steps + steps - right) * nbytes
    assert first.bytes_copied == steps * nbytes
    tokens, logits = decode_logits(load_cpu_layers(tiny_dir, 2, hybrid_cost=cost, cpu_layer_copies=True,
                                                   stage_cpu_guess=True))
    assert tokens == resident[0]
    err = (logits - resident[1]).norm() / resident[1].norm()
    assert err < 2e-2, f"relative logit error {err:.2e}"
    default = load_cpu_layers(tiny_dir, 2, hybrid_cost=cost, cpu_layer_copies=True)  # staging is opt-in
    assert all(b.experts.stage_ahead is None for b in default.model.moe_blocks())


class HostSlotKernel(SlotKernel):
    """The grouped kernels' contract on a CPU device: each id's expert computed by the cache's module over it."""

    def __init__(self, cache):
        super().__init__(cache.modules[0], cache.store.layout.nbytes, 1, cache.device)
        self.cache, self.mixed_calls = cache, []

    def ok(self, x):
        return x.shape[0] == 1

    def rows(self, x, ids):
        return torch.cat([self.cache.module_at(i)(x) for i in ids.tolist()])

    def mixed(self, layer, x, weights, slots, ranks, given):
        self.mixed_calls.append((layer, len(slots)))
        return super().mixed(layer, x, weights, slots, ranks, given)


@pytest.mark.parametrize("copy_ms, cpu_ms, on_cpu", [(1.0, 0.9, 1), (1.0, 0.4, 2)])
def test_a_cpu_layer_finishes_with_one_grouped_call(tiny_dir, resident, copy_ms, cpu_ms, on_cpu):
    """Where grouped kernels run, a CPU layer's CPU outputs and the GPU's share are summed by one SlotKernel.mixed call
    per step (a graph replay on CUDA); the result stays within the hybrid tolerance of the resident model and of the
    expert-by-expert combination."""
    cost = CostModel(copy_ms=copy_ms, cpu_ms=cpu_ms, smoothing=0.0)
    plain = decode_logits(load_cpu_layers(tiny_dir, 1, hybrid_cost=cost, cpu_layer_copies=True))
    engine = load_cpu_layers(tiny_dir, 1, hybrid_cost=cost, cpu_layer_copies=True)
    cpu_layer = engine.plan.cpu_layer_ids[0]
    kernel = HostSlotKernel(engine.expert_cache)
    engine.model.moe_blocks()[cpu_layer].experts.grouped = kernel
    tokens, logits = decode_logits(engine, n=6)
    steps = 5 + 5  # generate and decode_logits: 6 tokens each, the first from prefill
    top_k = engine.config.top_k
    assert kernel.mixed_calls == [(cpu_layer, top_k - on_cpu)] * steps
    assert tokens == resident[0][:6] == plain[0][:6]
    for reference in (resident[1], plain[1]):
        err = (logits - reference[: len(logits)]).norm() / reference[: len(logits)].norm()
        assert err < 2e-2, f"relative logit error {err:.2e}"
    assert (logits - plain[1][: len(logits)]).abs().max() < 1e-3  # float32: only the summation order differs


def test_cpu_layers_refuse_hybrid_off(tiny_dir):
    with pytest.raises(MoeOffloadError, match="--cpu-layers 1 computes experts on the CPU; it cannot go with --hybrid off"):
        load_cpu_layers(tiny_dir, 1, hybrid="off")


def test_cli_cpu_layers(tiny_dir):
    result = CliRunner().invoke(app, ["generate", str(tiny_dir), "-p", "Hello", "--temperature", "0",
                                      "--max-new-tokens", "4", "--device", "cpu", "--quantize", "4/2",
                                      "--cpu-layers", "2", "--cpu-threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["cpu_experts_per_token"] > 0  # per token of prompt and answer: decode steps only use the CPU


def test_cli_cpu_layers_out_of_range(tiny_dir):
    result = CliRunner().invoke(app, ["generate", str(tiny_dir), "-p", "Hi", "--device", "cpu", "--cpu-layers", "3"])
    assert result.exit_code == 1
    assert "--cpu-layers 3 must be 0..2" in result.output


def test_cpu_layers_auto_needs_cuda_and_the_fast_kernel(tiny_dir):
    import dataclasses

    from moe_offload.placement import cpu_layers_pay
    from moe_offload.quant.presets import make_preset
    from moe_offload.synthetic import synthetic_config

    engine = load_cpu_layers(tiny_dir, "auto", force=True)
    assert engine.plan is not None and engine.plan.cpu_layers == 0  # no CUDA device: CPU layers stay off
    mixtral = synthetic_config("mixtral-8x7b")
    assert cpu_layers_pay(mixtral, make_preset("4/2")) == cpu_kernels.int8_available()
    assert not cpu_layers_pay(mixtral, make_preset("4/3"))  # float CPU kernel: slower than a copy
    assert not cpu_layers_pay(dataclasses.replace(mixtral, hidden_size=4160), make_preset("4/2"))  # K % 128


def test_cli_cpu_layers_bad_value(tiny_dir):
    result = CliRunner().invoke(app, ["generate", str(tiny_dir), "-p", "Hi", "--device", "cpu", "--cpu-layers", "lots"])
    assert result.exit_code == 1
    assert "--cpu-layers 'lots' must be a number of layers or auto" in result.output


@pytest.mark.skipif(not cpu_kernels.available() or not cpu_kernels.int8_available(), reason="no integer CPU path")
def test_fused_cpu_work_runs_on_the_kernels_own_thread(tmp_path, monkeypatch):
    """With dims the integer path takes (multiples of 128), whole and split CPU experts start on the C library's worker
    thread (no Python thread involved) and still match copies only within tolerance."""
    from conftest import make_checkpoint

    from moe_offload.kernels.cpu import start

    started = []
    monkeypatch.setattr("moe_offload.kernels.cpu.start", lambda *a: started.append(a[2] is None) or start(*a))
    # multiples of 256: one chunk width for every matrix on AVX-512 hosts too (fusable)
    directory = make_checkpoint(tmp_path / "m", hidden_size=256, intermediate_size=512)
    tokens, reference = decode_logits(load(directory, hybrid="off"), n=8)
    ids = load(directory, hybrid="off").encode(PROMPT) + tokens
    for cost, split in ((ALL_CPU, False), (SPLITS, True)):
        started.clear()
        engine = load(directory, hybrid="on", hybrid_cost=cost, split=split)
        engine.hybrid._pool.submit = None  # the Python worker thread must not be needed
        kv = engine.model.new_kv_cache(64)
        n = len(ids) - len(tokens)
        logits = [engine.model(torch.tensor([ids[:n]]), kv, 0)[0, -1]]  # the copy-only run's tokens, teacher-forced
        logits += [engine.model(torch.tensor([[ids[i]]]), kv, i)[0, -1] for i in range(n, len(ids) - 1)]
        # int8 activations on the CPU (per group of 16): ~1-2% here, so greedy tokens of this random model may flip
        assert (torch.stack(logits) - reference).norm() / reference.norm() < 3e-2
        assert started and any(started) == split  # heads (no down matrices) where split
