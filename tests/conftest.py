"""Tiny random Mixtral checkpoints written with transformers' own classes, and an offline tokenizer."""

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


def make_checkpoint(directory: Path, layout: str = "per_expert", max_shard_size: str | None = None,
                    seed: int = 0, **overrides) -> Path:
    """Write a tiny random Mixtral with transformers' MixtralConfig/MixtralForCausalLM.

    layout "per_expert": save_pretrained's block_sparse_moe.experts.{e}.w1/w2/w3 keys;
    layout "fused": the mlp.experts.gate_up_proj/down_proj tensors of transformers >= 5.
    """
    from safetensors.torch import save_file
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(**{**TINY, **overrides})
    model = MixtralForCausalLM(config).eval()
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
    from transformers import MixtralForCausalLM

    return MixtralForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir):
    import moe_offload

    return moe_offload.load(tiny_dir, device="cpu", dtype="float32", max_context=256)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())
