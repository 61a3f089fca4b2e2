"""Tiny random checkpoints of every supported family written with transformers' own classes, and an offline
tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "Offloading keeps experts in host memory and copies them to the GPU.",
    "Grüße aus München! Ça va? 日本語のテキストも少し。 Emoji: 🙂🚀",
    "def hello(world):\n    return world * 2\n",
] * 20
VOCAB_SIZE = 320


def build_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    # Like Mixtral's tokenizer, encode() prepends <s>.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(str(directory))


TINY = dict(
    vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
    initializer_range=0.15, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
_COMMON = {k: v for k, v in TINY.items() if k not in ("intermediate_size", "num_local_experts")}
# Each family's tiny config exercises what sets it apart (K dims stay multiples of 64 for every preset).
FAMILY_CONFIGS: dict[str, dict] = {
    "mixtral": TINY,
    # shared expert + sigmoid gate, q/k/v biases, a dense layer in the middle, top-4 of 8 not renormalized
    "qwen2_moe": dict(_COMMON, num_hidden_layers=3, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128, intermediate_size=128, mlp_only_layers=[1],
                      qkv_bias=True, norm_topk_prob=False, rms_norm_eps=1e-6),
    # per-head q/k norms, head_dim 32 != hidden/heads 16, top-8 of 16 renormalized
    "qwen3_moe": dict(_COMMON, head_dim=32, num_experts=16, num_experts_per_tok=8, moe_intermediate_size=64,
                      intermediate_size=128, norm_topk_prob=True, rms_norm_eps=1e-6),
    # q/k norms over the whole projection, top-8 of 16 not renormalized
    "olmoe": dict(_COMMON, num_experts=16, num_experts_per_tok=8, intermediate_size=64, norm_topk_prob=False,
                  pad_token_id=0),
}


def hf_classes(family: str):
    import transformers

    prefix = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2Moe", "qwen3_moe": "Qwen3Moe", "olmoe": "Olmoe"}[family]
    return getattr(transformers, prefix + "Config"), getattr(transformers, prefix + "ForCausalLM")


def make_checkpoint(directory: Path, layout: str = "per_expert", max_shard_size: str | None = None,
                    seed: int = 0, family: str = "mixtral", **overrides) -> Path:
    """Write a tiny random model of ``family`` with transformers' own config and model classes.

    layout "per_expert": save_pretrained's keys (Mixtral's block_sparse_moe.experts.{e}.w1/w2/w3, the others'
    mlp.experts.{e}.*_proj); layout "fused": the mlp.experts.gate_up_proj/down_proj tensors of transformers >= 5.
    Biases and q/k norm weights (zeros and ones at init) are randomized so that getting them wrong shows.
    """
    from safetensors.torch import save_file

    config_class, model_class = hf_classes(family)
    torch.manual_seed(seed)
    config = config_class(**{**FAMILY_CONFIGS[family], **overrides})
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "per_expert":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(str(directory), **kwargs)
    elif layout == "fused":
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        assert any("gate_up_proj" in k for k in state), "this transformers version has no fused expert layout"
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(directory))
    else:
        raise ValueError(layout)
    build_tokenizer(directory)
    return directory


def hf_model(directory: Path):
    """The checkpoint in ``directory`` as transformers' own model (its family from config.json), float32."""
    _, model_class = hf_classes(read_json(directory / "config.json")["model_type"])
    return model_class.from_pretrained(str(directory), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir):
    import moe_offload

    return moe_offload.load(tiny_dir, device="cpu", dtype="float32", max_context=256)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
