import pytest

from moe_offload.errors import MoeOffloadError
from moe_offload.offload.planner import format_bytes, parse_size, plan

MiB, GiB = 2**20, 2**30
# Mixtral-8x7B-like: 32 layers x 8 experts, top-2, ~66 MiB per 3-bit expert.
MODEL = dict(expert_bytes=66 * MiB, num_layers=32, num_experts=8, top_k=2,
             non_expert_bytes=3 * GiB // 2, kv_cache_bytes=256 * MiB, workspace_bytes=256 * MiB)
FIXED = 2 * GiB  # non-expert + KV + workspace


def test_budget_gives_every_whole_slot_spread_over_the_layers():
    p = plan(12 * GiB, **MODEL)
    # (12 - 2) GiB // 66 MiB = 155 slots -> 4 per layer, and 27 layers get a 5th
    assert (p.slots_per_layer, p.extra_slots, p.total_slots) == (4, 27, 155)
    assert sum(p.layer_slots) == 155 and sorted(set(p.layer_slots)) == [4, 5] and p.layer_slots.count(5) == 27
    fours = [l for l, n in enumerate(p.layer_slots) if n == 4]
    assert len(fours) == 5 and min(b - a for a, b in zip(fours, fours[1:])) >= 6  # spread over the depth
    assert not p.all_resident and p.resident_fraction == 155 / 256
    assert p.experts_total_bytes == 155 * 66 * MiB
    assert p.used_bytes == FIXED + 155 * 66 * MiB <= 12 * GiB
    assert "4-5 per layer: 27 layers have 5" in str(p)


def test_even_split_has_no_extra_slots():
    p = plan(FIXED + 96 * 66 * MiB, **MODEL)
    assert (p.slots_per_layer, p.extra_slots, p.layer_slots) == (3, 0, [3] * 32)


def test_global_policy_uses_every_slot():
    p = plan(12 * GiB, **MODEL, policy="global-lru")
    assert (p.slots_per_layer, p.total_slots) == (None, 155)


def test_exactly_one_slot_per_layer():
    p = plan(FIXED + 32 * 66 * MiB, **MODEL)
    assert (p.slots_per_layer, p.total_slots) == (1, 32)
    with pytest.raises(MoeOffloadError):
        plan(FIXED + 32 * 66 * MiB - 1, **MODEL)


def test_budget_too_small_names_the_numbers():
    with pytest.raises(MoeOffloadError) as e:
        plan(3 * GiB, **MODEL)
    msg = str(e.value)
    for text in ("3.00 GiB", "non-expert weights 1.50 GiB", "KV cache 256.0 MiB", "workspace 256.0 MiB",
                 "leave 1.00 GiB", "32 x 66.0 MiB", "at least 4.06 GiB", "--gpu-memory", "--max-context",
                 "smaller preset", "or --policy global-lru (needs 2 slots in all)"):
        assert text in msg, (text, msg)
    assert "\n" not in msg
    with pytest.raises(MoeOffloadError) as e:  # not even top_k slots: no global-lru hint
        plan(FIXED + 66 * MiB, **MODEL)
    assert "global-lru" not in str(e.value)


def test_global_policy_needs_top_k_slots():
    assert plan(FIXED + 2 * 66 * MiB, **MODEL, policy="global-lru").total_slots == 2
    with pytest.raises(MoeOffloadError, match="global-lru needs top_k=2 x 66.0 MiB"):
        plan(FIXED + 2 * 66 * MiB - 1, **MODEL, policy="global-lru")
    with pytest.raises(MoeOffloadError, match="leave 0 B for experts"):
        plan(GiB, **MODEL, policy="global-lru")  # fixed costs alone exceed the budget


@pytest.mark.parametrize("budget", [None, 100 * GiB])
def test_everything_fits(budget):
    p = plan(budget, **MODEL)
    assert p.all_resident and p.resident_fraction == 1.0
    assert (p.slots_per_layer, p.total_slots) == (8, 256)  # capped at the model's experts
    assert "none (all resident)" in str(p)


def test_offload_per_layer():
    p = plan(None, **MODEL, offload_per_layer=3)
    assert (p.slots_per_layer, p.total_slots) == (5, 160)
    assert plan(None, **MODEL, offload_per_layer=0).all_resident
    assert plan(16 * GiB, **MODEL, offload_per_layer=4).total_slots == 128  # 2 + 8.25 GiB fits
    with pytest.raises(MoeOffloadError, match="offload_per_layer=8 must be 0..7"):
        plan(None, **MODEL, offload_per_layer=8)
    with pytest.raises(MoeOffloadError, match="offload_per_layer=-1"):
        plan(None, **MODEL, offload_per_layer=-1)
    with pytest.raises(MoeOffloadError, match=r"offload_per_layer=2 keeps 192 experts .* 14.38 GiB.*12.00 GiB"):
        plan(12 * GiB, **MODEL, offload_per_layer=2)


def test_unknown_policy():
    with pytest.raises(MoeOffloadError, match="choose one of lru, global-lru, lfu"):
        plan(None, **MODEL, policy="fifo")


def test_table():
    p = plan(12 * GiB, **MODEL)
    rows = dict(p.rows())
    assert rows["GPU budget"] == "12.00 GiB"
    assert rows["expert slots"] == "155 (4-5 per layer: 27 layers have 5) of 256 experts, 60.5%"
    assert rows["expert memory"] == "155 x 66.0 MiB = 9.99 GiB"
    assert rows["total used"] == "11.99 GiB"
    assert dict(plan(FIXED + 96 * 66 * MiB, **MODEL).rows())["expert slots"] == "96 (3 per layer) of 256 experts, 37.5%"
    lines = str(p).splitlines()
    assert len(lines) == len(rows) and lines[0].startswith("GPU budget ")
    assert dict(plan(None, **MODEL).rows())["GPU budget"] == "no cap"


def test_plan_is_frozen():
    p = plan(None, **MODEL)
    with pytest.raises(AttributeError):
        p.total_slots = 1


@pytest.mark.parametrize("text, expected", [
    ("12GiB", 12 * GiB), ("12.5GiB", int(12.5 * GiB)), ("12 gib", 12 * GiB), ("12GB", 12 * 10**9),
    ("800MiB", 800 * MiB), ("800mb", 800 * 10**6), ("64KiB", 64 * 1024), ("2KB", 2000), ("4096B", 4096),
    (" 0.5 GiB ", GiB // 2), (".25MiB", MiB // 4), ("1TiB", 1024 * GiB),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["12", "GiB", "-1GiB", "12 GiBs", "1e3MiB", "twelve GiB", "", "1.2.3GiB"])
def test_parse_size_errors(text):
    with pytest.raises(MoeOffloadError, match=f"cannot read size {text!r}"):
        parse_size(text)


def test_format_bytes():
    assert [format_bytes(n) for n in (512, 2048, 3 * MiB // 2, 12 * GiB)] == ["512 B", "2.0 KiB", "1.5 MiB",
                                                                           "12.00 GiB"]


# -- CPU layers (llama.cpp's --n-cpu-moe): no slots, their experts computed on the CPU at decode ---------------
def test_cpu_layers_get_no_slots_and_are_spread():
    p = plan(12 * GiB, **MODEL, cpu_layers=8)
    assert p.cpu_layer_ids == [0, 4, 8, 12, 16, 20, 24, 28]
    assert plan(12 * GiB, **MODEL, cpu_layers=9).cpu_layer_ids == [0, 3, 7, 10, 14, 17, 21, 24, 28]
    assert plan(None, **MODEL, cpu_layers=32).cpu_layer_ids == list(range(32))
    slots = p.layer_slots
    assert [slots[l] for l in p.cpu_layer_ids] == [0] * 8
    gpu = [slots[l] for l in range(32) if l not in p.cpu_layer_ids]
    # the same 155 slots now serve 24 layers: 6 each, 11 of them a 7th
    assert p.total_slots == 155 and sum(gpu) == 155 and sorted(set(gpu)) == [6, 7] and gpu.count(7) == 11
    assert not p.all_resident
    assert "CPU layers" in str(p) and "8 of 32" in str(p)


def test_cpu_layers_cap_slots_at_the_gpu_layers_experts():
    p = plan(None, **MODEL, cpu_layers=16)
    assert p.total_slots == 16 * 8 and p.layer_slots.count(8) == 16 and not p.all_resident


def test_all_layers_on_the_cpu_need_only_the_fixed_part():
    p = plan(FIXED, **MODEL, cpu_layers=32)
    assert (p.total_slots, p.layer_slots) == (0, [0] * 32)
    with pytest.raises(MoeOffloadError, match="too small"):
        plan(FIXED - 1, **MODEL, cpu_layers=32)


@pytest.mark.parametrize("kwargs, message", [
    (dict(cpu_layers=33), "--cpu-layers 33 must be 0..32"),
    (dict(cpu_layers=-1), "--cpu-layers -1 must be 0..32"),
    (dict(cpu_layers=4, policy="global-lru"), "needs a per-layer cache policy"),
    (dict(cpu_layers=4, offload_per_layer=2), "either --cpu-layers or --offload-per-layer"),
])
def test_cpu_layers_errors(kwargs, message):
    with pytest.raises(MoeOffloadError, match=message):
        plan(12 * GiB, **MODEL, **kwargs)


def test_too_small_suggests_cpu_layers():
    with pytest.raises(MoeOffloadError, match="--cpu-layers"):
        plan(FIXED + 10 * 66 * MiB, **MODEL)


def test_auto_cpu_layers_leave_the_cached_layers_three_quarters_of_their_experts():
    from moe_offload.offload.planner import auto_cpu_layers

    sizes = {k: v for k, v in MODEL.items() if k != "top_k"}
    # 12 GiB: 155 slots; 6 per cached layer (3/4 of 8) -> 32 - 155 / 6 = 6.2 -> 7 CPU layers
    assert auto_cpu_layers(12 * GiB, **sizes) == 7
    assert auto_cpu_layers(FIXED + 90 * 66 * MiB, **sizes) == 17  # 90 slots (Mixtral 4/2 at 9.6 GB)
    assert auto_cpu_layers(FIXED + 20 * 66 * MiB, **sizes) == 29  # 20 slots: 29 layers leave 3 with ~6.7 each
    assert auto_cpu_layers(FIXED, **sizes) == 32  # no slot at all: every layer on the CPU
    assert auto_cpu_layers(FIXED + 192 * 66 * MiB, **sizes) == 0  # 6 per layer already
    assert auto_cpu_layers(None, **sizes) == 0
    p = plan(12 * GiB, **MODEL, cpu_layers=auto_cpu_layers(12 * GiB, **sizes))
    assert min(p.layer_slots[l] for l in range(32) if l not in p.cpu_layer_ids) >= 6


def test_auto_cpu_layers_with_copies_keep_every_other_layer_whole():
    from moe_offload.offload.planner import AUTO_CACHED_SHARE_WITH_COPIES, auto_cpu_layers

    sizes = {k: v for k, v in MODEL.items() if k != "top_k"}
    share = AUTO_CACHED_SHARE_WITH_COPIES
    assert auto_cpu_layers(FIXED + 139 * 66 * MiB, cached_share=share, **sizes) == 15  # Mixtral 4/2 at 12 GiB: 17 x 8
    assert auto_cpu_layers(FIXED + 90 * 66 * MiB, cached_share=share, **sizes) == 21  # 9.6 GB: 11 x 8
    assert auto_cpu_layers(FIXED + 256 * 66 * MiB, cached_share=share, **sizes) == 0  # everything fits
    budget = FIXED + 139 * 66 * MiB
    p = plan(budget, **MODEL, cpu_layers=auto_cpu_layers(budget, cached_share=share, **sizes))
    assert all(p.layer_slots[l] == 8 for l in range(32) if l not in p.cpu_layer_ids)


def test_spare_room_becomes_prefill_scratch_slots_when_every_gpu_layer_is_whole():
    """CPU layers leave the other layers whole; the budget's leftover whole experts become scratch slots for prefill (it
    streams a CPU layer's experts through them), up to one layer's worth. Copies-only plans have no spare room."""
    from moe_offload.config import ModelConfig
    from moe_offload.placement import prefill_scratch_slots, scratch_slots

    sizes = dict(expert_bytes=66 * MiB, num_layers=32, num_experts=8, top_k=2, non_expert_bytes=3 * GiB // 2,
                 kv_cache_bytes=256 * MiB, workspace_bytes=256 * MiB)
    config = ModelConfig(model_type="mixtral", vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=32, num_heads=4,
                         num_kv_heads=2, head_dim=16, num_experts=8, top_k=2)
    with_cpu = plan(FIXED + 139 * 66 * MiB + 10 * MiB, cpu_layers=15, **sizes)  # 17 whole layers: 136 slots
    assert with_cpu.total_slots == 136 and with_cpu.spare_slots == 3
    assert scratch_slots(config) == 2 and prefill_scratch_slots(config, with_cpu) == 3
    assert prefill_scratch_slots(config, plan(FIXED + 200 * 66 * MiB, cpu_layers=15, **sizes)) == 6  # up to a layer
    copies = plan(FIXED + 139 * 66 * MiB, **sizes)
    assert copies.total_slots == 139 and copies.spare_slots == 0 and prefill_scratch_slots(config, copies) == 0
    every_cpu = plan(FIXED + 3 * 66 * MiB + 10 * MiB, cpu_layers=32, **sizes)  # no layer has slots: all is spare
    assert every_cpu.total_slots == 0 and every_cpu.spare_slots == 3 and prefill_scratch_slots(config, every_cpu) == 3


def test_the_prefill_ring_can_be_forced_for_profiling(monkeypatch):
    from moe_offload.config import ModelConfig
    from moe_offload.placement import prefill_scratch_slots

    config = ModelConfig(model_type="mixtral", vocab_size=32, hidden_size=64, intermediate_size=128, num_layers=32,
                         num_heads=4, num_kv_heads=2, head_dim=16, num_experts=8, top_k=2)
    p = plan(FIXED + 139 * 66 * MiB, **MODEL)
    assert prefill_scratch_slots(config, p) == 0
    monkeypatch.setenv("MOE_OFFLOAD_PREFILL_RING", "5")
    assert prefill_scratch_slots(config, p) == 5


def test_an_offloading_plan_on_a_gpu_keeps_the_embedding_table_in_host_memory(monkeypatch):
    """On a GPU, offloading moves the embedding table to host memory and gives its room to experts (Mixtral 4/2: 250
    MiB, three or four more slots); a model that fits whole keeps it on the GPU; a budget that fits every expert
    only without the table still offloads, so that the table stays on the host."""
    import dataclasses

    import torch

    from moe_offload import placement
    from moe_offload.quant.presets import PRESETS
    from moe_offload.synthetic import synthetic_config

    monkeypatch.setattr(placement, "cuda_runtime_bytes", lambda device: 0)  # no CUDA here: plan as if on one
    config, preset, cuda = synthetic_config("mixtral-8x7b"), PRESETS["4/2"], torch.device("cuda")
    table = placement.host_weights_bytes(config, torch.bfloat16)
    assert table == 32000 * 4096 * 2
    options = placement.OffloadOptions(gpu_memory="12GiB")
    on_gpu = placement.plan_placement(config, preset, cuda, torch.bfloat16, 1024, options)
    assert on_gpu.host_weights_bytes == table and "in host memory" in str(on_gpu)
    on_cpu_device = placement.plan_placement(config, preset, torch.device("cpu"), torch.bfloat16, 1024, options)
    assert on_cpu_device.host_weights_bytes == 0  # there every weight is in host memory anyway
    expert = on_gpu.expert_bytes
    # Same budget, same workspace: the table's bytes become whole expert slots.
    fixed = on_gpu.non_expert_bytes + on_gpu.kv_cache_bytes + on_gpu.workspace_bytes + on_gpu.scratch_bytes
    assert on_gpu.scratch_bytes == 2 * expert  # the top-2 scratch slots are counted on a GPU
    assert on_gpu.total_slots == (on_gpu.budget_bytes - fixed) // expert
    assert on_gpu.total_slots - (on_gpu.budget_bytes - fixed - table) // expert in (3, 4)
    whole = on_gpu.non_expert_bytes + table + on_gpu.kv_cache_bytes + on_gpu.workspace_bytes + 256 * expert
    assert placement.plan_placement(config, preset, cuda, torch.bfloat16, 1024,
                                    placement.OffloadOptions(gpu_memory=whole)) is None
    just = placement.plan_placement(config, preset, cuda, torch.bfloat16, 1024,
                                    placement.OffloadOptions(gpu_memory=whole - table // 4))
    assert just is not None and just.total_slots == 256 and just.host_weights_bytes == table
    tied = dataclasses.replace(config, tie_word_embeddings=True)  # lm_head reads the table: it stays on the GPU
    assert placement.host_weights_bytes(tied, torch.bfloat16) == 0


def test_auto_streams_every_layer_where_no_cache_fits(monkeypatch):
    """Experts without a fast CPU kernel (4/3) get no CPU layers from --cpu-layers auto, except where no cache fits at
    all: then every layer streams its experts through the scratch slots (the server copies them), instead of failing.
    Without the served layers (off, or no CPU path) the budget stays too small."""
    import torch

    from moe_offload import placement
    from moe_offload.quant.presets import PRESETS
    from moe_offload.synthetic import synthetic_config

    monkeypatch.setattr(placement, "cuda_runtime_bytes", lambda device: 0)  # no CUDA here: plan as if on one
    config, cuda = synthetic_config("mixtral-8x7b"), torch.device("cuda")
    if placement.hybrid_unsupported(config, PRESETS["4/3"].experts) is not None:
        pytest.skip("no CPU expert kernel here")

    def plan(budget, **options):
        return placement.plan_placement(config, PRESETS["4/3"], cuda, torch.bfloat16, 640,
                                        placement.OffloadOptions(gpu_memory=budget, cpu_layers="auto", **options))

    assert plan("12GiB").cpu_layers == 0  # a cache fits: 4/3 copies only, as before
    for mode in ("auto", "on"):
        streamed = plan("2580MiB", serve_cpu_layers=mode)
        assert streamed.cpu_layers == 32 and streamed.total_slots == 0
        assert streamed.used_bytes <= streamed.budget_bytes
    with pytest.raises(MoeOffloadError, match="too small"):
        plan("2580MiB", serve_cpu_layers="off")
    with pytest.raises(MoeOffloadError, match="too small"):
        plan("2580MiB", hybrid="off", serve_cpu_layers="on")
