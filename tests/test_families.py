"""Every supported family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) through one harness: our model against
transformers' on tiny random checkpoints, offloading, quantization presets, quantized checkpoints, synthetic
shapes and the static decode step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moe_offload
from conftest import FAMILY_CONFIGS, hf_model, make_checkpoint
from moe_offload.config import ModelConfig
from moe_offload.errors import MoeOffloadError
from moe_offload.graphs import GraphedDecode
from moe_offload.loading import canonical_name
from moe_offload.model import MoeTransformer
from moe_offload.placement import OffloadOptions
from moe_offload.quant.hqq import dequantize
from moe_offload.quant.linear import QuantLinear
from moe_offload.quant.presets import PRESETS, make_preset
from moe_offload.synthetic import SHAPES, synthetic_config, synthetic_layers
from moe_offload.weights import expert_layout, non_expert_bytes, non_expert_shapes

FAMILIES = list(FAMILY_CONFIGS)
NEW_FAMILIES = [f for f in FAMILIES if f != "mixtral"]  # Mixtral's own tests live in test_model.py
ATOL, RTOL = 2e-5, 1e-4
IDS = torch.randint(3, 320, (20,), generator=torch.Generator().manual_seed(11)).tolist()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> {layout -> directory}, built lazily (the same random weights in both layouts)."""
    root, made = tmp_path_factory.mktemp("families"), {}

    def get(family: str, layout: str = "per_expert"):
        if (family, layout) not in made:
            made[family, layout] = make_checkpoint(root / f"{family}-{layout}", layout=layout, seed=1, family=family)
        return made[family, layout]

    return get


@pytest.fixture
def fast_quantize(monkeypatch):
    """HQQ without its zero-point solver (tests/quant covers the solver): the same codes, layout and format at a
    twentieth of the CPU time, which is what a test of every family through every preset can afford."""
    from moe_offload import weights
    from moe_offload.quant.hqq import quantize

    monkeypatch.setattr(weights, "quantize", lambda w, spec: quantize(w, spec, optimize=False))


def load(directory, **kwargs):
    return moe_offload.load(directory, device="cpu", dtype="float32", max_context=128, **kwargs)


def ours_logits(engine, ids, chunks):
    kv, out, start = engine.model.new_kv_cache(128), [], 0
    for n in chunks:
        out.append(engine.model(torch.tensor([ids[start : start + n]]), kv, start))
        start += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_logits_match_transformers(checkpoints, family, layout):
    directory = checkpoints(family, layout)
    with torch.no_grad():
        ref = hf_model(directory)(torch.tensor([IDS])).logits
    engine = load(directory)
    # one prefill, then prefill in chunks and single-token decode steps through the KV cache
    torch.testing.assert_close(ours_logits(engine, IDS, [len(IDS)]), ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ours_logits(engine, IDS, [9, 3] + [1] * 8), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_greedy_tokens_match_transformers_generate(checkpoints, family):
    directory = checkpoints(family)
    ids = IDS[:8]
    with torch.no_grad():
        ref = hf_model(directory).generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                           eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert load(directory).generate(ids, max_new_tokens=16, temperature=0, ignore_eos=True).tokens == ref


@pytest.mark.parametrize("variant", [
    ("qwen3_moe", {"attention_bias": True, "norm_topk_prob": False, "num_hidden_layers": 4, "decoder_sparse_step": 2}),
    ("olmoe", {"clip_qkv": 0.5, "attention_bias": True, "norm_topk_prob": True}),
    ("qwen2_moe", {"mlp_only_layers": [], "qkv_bias": False, "tie_word_embeddings": True}),
], ids=["qwen3-bias-sparse-step", "olmoe-clip-bias", "qwen2-all-moe-tied"])
def test_family_variants_match_transformers(tmp_path, variant):
    family, overrides = variant
    directory = make_checkpoint(tmp_path / "m", seed=4, family=family, **overrides)
    with torch.no_grad():
        ref = hf_model(directory)(torch.tensor([IDS])).logits
    torch.testing.assert_close(ours_logits(load(directory), IDS, [12] + [1] * 8), ref, atol=ATOL, rtol=RTOL)


def test_family_fields_from_config_json(checkpoints):
    qwen2 = ModelConfig.from_file(checkpoints("qwen2_moe") / "config.json")
    assert (qwen2.shared_expert_intermediate_size, qwen2.intermediate_size, qwen2.dense_intermediate_size) == (128, 64, 128)
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.qk_norm is None and not qwen2.norm_topk_prob
    assert qwen2.moe_layers == (0, 2) and not qwen2.is_moe_layer(1)
    qwen3 = ModelConfig.from_file(checkpoints("qwen3_moe") / "config.json")
    assert (qwen3.head_dim, qwen3.qk_norm, qwen3.norm_topk_prob, qwen3.num_experts, qwen3.top_k) == (32, "head", True, 16, 8)
    olmoe = ModelConfig.from_file(checkpoints("olmoe") / "config.json")
    assert (olmoe.qk_norm, olmoe.norm_topk_prob, olmoe.rope_theta, olmoe.clip_qkv) == ("full", False, 1e4, None)
    mixtral = ModelConfig.from_file(checkpoints("mixtral") / "config.json")
    assert mixtral.norm_topk_prob and mixtral.qk_norm is None and mixtral.moe_layers == (0, 1)


def test_config_errors_name_the_field(checkpoints):
    raw = json.loads((checkpoints("qwen3_moe") / "config.json").read_text())
    with pytest.raises(MoeOffloadError, match="model_type 'deepseek_v3' is not supported; supported: "
                                              "mixtral, qwen2_moe, qwen3_moe, olmoe"):
        ModelConfig.from_dict({**raw, "model_type": "deepseek_v3"})
    with pytest.raises(MoeOffloadError, match="use_sliding_window=true is not supported"):
        ModelConfig.from_dict({**raw, "use_sliding_window": True, "sliding_window": 64})
    with pytest.raises(MoeOffloadError, match="'moe_intermediate_size' is missing"):
        ModelConfig.from_dict({k: v for k, v in raw.items() if k != "moe_intermediate_size"})
    with pytest.raises(MoeOffloadError, match="mlp_only_layers has 7"):
        ModelConfig.from_dict({**raw, "mlp_only_layers": [7]})
    with pytest.raises(MoeOffloadError, match="no layer is a MoE layer"):
        ModelConfig.from_dict({**raw, "mlp_only_layers": [0, 1]})
    with pytest.raises(MoeOffloadError, match="hidden_act 'gelu'"):
        ModelConfig.from_dict({**raw, "hidden_act": "gelu"})


@pytest.mark.parametrize("family", FAMILIES)
def test_non_expert_shapes_are_the_models_resident_parameters(checkpoints, family):
    """What the planner counts and the synthetic models draw is exactly the model minus its routed experts."""
    config = ModelConfig.from_file(checkpoints(family) / "config.json")
    with torch.device("meta"):
        model = MoeTransformer(config)
    model.tie_weights()
    resident = {n: tuple(p.shape) for n, p in model.named_parameters() if ".moe.experts." not in n}
    assert non_expert_shapes(config) == resident
    assert non_expert_bytes(config, None, torch.float32) == 4 * sum(torch.Size(s).numel() for s in resident.values())


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_offloading_keeps_greedy_tokens(checkpoints, family):
    directory = checkpoints(family)
    resident = load(directory)
    ref_logits = ours_logits(resident, IDS, [len(IDS)])
    ref_tokens = resident.generate(IDS[:6], max_new_tokens=10, temperature=0, ignore_eos=True).tokens
    config = resident.config
    for options in (OffloadOptions(offload_per_layer=config.num_experts - config.top_k, prefetch=1),
                    OffloadOptions(offload_per_layer=config.num_experts - 1, prefetch=2, policy="lfu")):
        engine = load(directory, offload=options)
        assert engine.plan is not None and engine.plan.num_layers == len(config.moe_layers)
        assert torch.equal(ours_logits(engine, IDS, [len(IDS)]), ref_logits)
        assert engine.generate(IDS[:6], max_new_tokens=10, temperature=0, ignore_eos=True).tokens == ref_tokens
        s = engine.cache_stats.summary()
        assert len(engine.cache_stats.layers) == len(config.moe_layers) and s["misses"] > 0
        assert s["prefetch_copies"] > 0 and 0 < s["prefetch_recall"] <= 1


def dequantized_reference(engine, directory):
    """transformers' model carrying our quantized engine's weights, dequantized (an independent forward)."""
    ours = {n: t for n, t in list(engine.model.named_parameters()) + list(engine.model.named_buffers())}
    for name, module in engine.model.named_modules():
        if isinstance(module, QuantLinear):
            ours[f"{name}.weight"] = dequantize(module.qt, torch.float32)
    ref = hf_model(directory)
    state = {}
    for key, value in ref.state_dict().items():
        if key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):  # transformers >= 5, fused
            layer = key.split(".")[2]
            expert = lambda e, p: ours[f"layers.{layer}.moe.experts.experts.{e}.{p}.weight"]
            if key.endswith("gate_up_proj"):
                state[key] = torch.stack([torch.cat([expert(e, "gate_proj"), expert(e, "up_proj")])
                                          for e in range(value.shape[0])])
            else:
                state[key] = torch.stack([expert(e, "down_proj") for e in range(value.shape[0])])
            continue
        name = canonical_name(key)
        assert name is not None, key
        state[key] = ours[name.replace(".experts.", ".moe.experts.experts.")] if ".experts." in name else ours[name]
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_each_preset_loads_and_generates(checkpoints, family, fast_quantize):
    directory = checkpoints(family)
    for preset in PRESETS:
        engine = load(directory, quantize=preset)
        assert isinstance(engine.model.layers[0].self_attn.q_proj, QuantLinear)
        if engine.config.shared_expert_intermediate_size:  # resident MLPs are quantized like attention
            assert isinstance(engine.model.layers[0].moe.shared_expert.down_proj, QuantLinear)
            assert isinstance(engine.model.layers[1].mlp.up_proj, QuantLinear)
        with torch.no_grad():
            ref = dequantized_reference(engine, directory)(torch.tensor([IDS[:14]])).logits
        torch.testing.assert_close(ours_logits(engine, IDS[:14], [10] + [1] * 4), ref, atol=1e-4, rtol=1e-4)
        out = engine.generate(IDS[:6], max_new_tokens=4, temperature=0, ignore_eos=True)
        assert len(out.tokens) == 4


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_quantized_checkpoint_round_trip_and_offload(checkpoints, tmp_path, family, fast_quantize):
    from moe_offload.checkpoint import write_checkpoint
    from moe_offload.engine import open_layers

    directory = checkpoints(family)
    config = ModelConfig.from_file(directory / "config.json")
    layers, preset = open_layers(directory, config, quantize="4/3", quantize_device=torch.device("cpu"))
    write_checkpoint(tmp_path / "q", layers, directory, config, preset)
    on_the_fly = ours_logits(load(directory, quantize="4/3"), IDS, [len(IDS)])
    assert torch.equal(ours_logits(load(tmp_path / "q"), IDS, [len(IDS)]), on_the_fly)
    offloaded = load(tmp_path / "q", offload=OffloadOptions(offload_per_layer=config.num_experts // 2, prefetch=1))
    assert torch.equal(ours_logits(offloaded, IDS, [len(IDS)]), on_the_fly)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_static_decode_step_matches_dynamic(checkpoints, family):
    """The step CUDA graphs capture (here run eagerly): shared experts and dense layers included."""
    engine = load(checkpoints(family))
    dynamic, static = engine.new_session(), engine.new_session()
    logits, _ = dynamic.prefill(IDS[:9])
    static.prefill(IDS[:9])
    decoder = GraphedDecode(engine.model, static.kv, use_graphs=False)
    token = int(logits.argmax())
    for _ in range(8):
        a, b = dynamic.step(token), decoder.step(token, len(static.tokens))
        static.tokens.append(token)
        static.kv.length = len(static.tokens)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        token = int(a.argmax())


@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b", "mixtral-8x22b"])
def test_synthetic_presets_have_real_shapes_that_every_preset_can_pack(name):
    c = synthetic_config(name)
    expected = {
        "qwen3-30b-a3b": ("qwen3_moe", 2048, 48, 32, 4, 128, 128, 8, 768, 151936, "head", True),
        "olmoe-1b-7b": ("olmoe", 2048, 16, 16, 16, 128, 64, 8, 1024, 50304, "full", False),
        "qwen1.5-moe-a2.7b": ("qwen2_moe", 2048, 24, 16, 16, 128, 60, 4, 1408, 151936, None, False),
        "mixtral-8x22b": ("mixtral", 6144, 56, 48, 8, 128, 8, 2, 16384, 32768, None, True),
    }[name]
    assert (c.model_type, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.num_experts,
            c.top_k, c.intermediate_size, c.vocab_size, c.qk_norm, c.norm_topk_prob) == expected
    for preset in PRESETS:  # K dims divide every group size (raises otherwise)
        expert_layout(c, make_preset(preset), torch.bfloat16)
        non_expert_bytes(c, make_preset(preset), torch.bfloat16)


REDUCED = dict(vocab_size=320, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
               num_experts=16, intermediate_size=64)


def test_synthetic_lean_metadata_matches_8bit():
    """Random 4/2-lean weights are 4/2's with the scales and zeros on a 16-level grid: same codes, metadata within
    half a 4-bit step (plus half an 8-bit one) of 4/2's."""
    from moe_offload.quant.hqq import QuantSpec, dequantize_meta
    from moe_offload.synthetic import random_quantized

    shape = (256, 4096)
    qts = [random_quantized(shape, QuantSpec(2, 16, True, bits), torch.Generator().manual_seed(0), torch.device("cpu"))
           for bits in (8, 4)]
    eight, four = qts
    assert torch.equal(eight.qweight, four.qweight) and four.scale.q is four.zero.q
    for a, b in ((eight.scale, four.scale), (eight.zero, four.zero)):
        blocks = shape[1] // 16 // b.step.shape[1]
        tol = (b.step.float() / 2 + a.step.float() / 2).repeat_interleave(blocks, dim=1) * 1.01
        assert bool(((dequantize_meta(a) - dequantize_meta(b)).abs() <= tol).all())


@pytest.mark.parametrize("preset", ["4/2", "4/2-lean"])
@pytest.mark.parametrize("name", ["qwen3-30b-a3b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b"])
def test_synthetic_layers_fit_the_model(name, preset):
    """Every synthetic tensor lands in the model (assemble rejects strays and reports missing ones)."""
    from moe_offload.engine import LoadOptions, _build

    shapes = {**SHAPES[name], **REDUCED}
    if shapes.get("shared_expert_intermediate_size"):
        shapes.update(shared_expert_intermediate_size=128, mlp_only_layers=(1,), dense_intermediate_size=128)
    config = ModelConfig(**shapes)
    preset = make_preset(preset)
    layers = synthetic_layers(config, preset, torch.device("cpu"), torch.float32)
    engine = _build(config, None, Path(f"synthetic:{name}"), layers, preset,
                    LoadOptions(torch.device("cpu"), torch.float32, 64, False), OffloadOptions(offload_per_layer=8))
    session = engine.new_session()  # no tokenizer: token ids straight into a session
    token = int(session.prefill(list(range(3, 12)))[0].argmax())
    for _ in range(4):
        token = int(session.step(token).argmax())
    assert 0 <= token < config.vocab_size and engine.cache_stats.summary()["misses"] > 0


def test_bench_cli_on_reduced_qwen3_shape(tmp_path, monkeypatch):
    """`bench --synthetic qwen3-30b-a3b` end to end, at a reduced size that keeps the family's features."""
    from typer.testing import CliRunner

    from moe_offload.cli import app

    monkeypatch.setitem(SHAPES, "qwen3-30b-a3b", {**SHAPES["qwen3-30b-a3b"], **REDUCED})
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--synthetic", "qwen3-30b-a3b", "--device", "cpu", "--prompt-tokens",
                                      "16", "--new-tokens", "6", "--offload-per-layer", "8", "--max-context", "64",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["model"] == "synthetic:qwen3-30b-a3b" and data["slots_per_layer"] == 8
    assert data["total_slots"] == 8 * REDUCED["num_layers"] and data["hit_rate"] < 1
