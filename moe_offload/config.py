"""ModelConfig: the architecture facts the model code needs, read from a checkpoint's config.json.

Each difference between MoE families is one explicit field here; the model has one branch for it.
``FAMILIES`` says how each supported model_type spells those fields in its config.json (and what
transformers assumes when a field is absent).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import MoeOffloadError

QK_NORMS = ("head", "full")


@dataclass(frozen=True, slots=True)
class Family:
    """How one model_type's config.json names the family fields; defaults are transformers' own."""

    expert_size: str  # config.json field with each routed expert's ffn width
    rope_theta: float  # when config.json gives none
    experts: tuple[str, ...] = ("num_local_experts", "num_experts")  # first present wins
    qk_norm: str | None = None  # see ModelConfig.qk_norm
    norm_topk_prob: bool | None = False  # default of the field; None: no field, always renormalized
    qkv_bias: tuple[str, bool] | None = None  # (field, default) for biases on q/k/v
    o_bias: str | None = None  # field that also puts a bias on o_proj
    clip_qkv: bool = False  # reads clip_qkv
    shared_expert: bool = False  # reads shared_expert_intermediate_size
    dense_layers: bool = False  # reads mlp_only_layers, decoder_sparse_step; dense width from intermediate_size
    sliding_switch: str | None = None  # sliding_window counts only when this field is true


FAMILIES: dict[str, Family] = {
    "mixtral": Family("intermediate_size", 1e6, norm_topk_prob=None),
    "qwen2_moe": Family("moe_intermediate_size", 1e4, qkv_bias=("qkv_bias", True), shared_expert=True,
                        dense_layers=True, sliding_switch="use_sliding_window"),
    "qwen3_moe": Family("moe_intermediate_size", 1e4, qk_norm="head", qkv_bias=("attention_bias", False),
                        o_bias="attention_bias", dense_layers=True, sliding_switch="use_sliding_window"),
    "olmoe": Family("intermediate_size", 1e4, qk_norm="full", qkv_bias=("attention_bias", False),
                    o_bias="attention_bias", clip_qkv=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per routed expert
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    norm_topk_prob: bool = True  # renormalize the top-k router weights to sum to 1
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None  # dtype the checkpoint was saved in
    # --- family differences (the defaults are Mixtral's) ---
    qk_norm: str | None = None  # "head": RMSNorm of each q/k head over head_dim (Qwen3); "full": over the whole
    #                             q/k projection output, before the split into heads (OLMoE)
    qkv_bias: bool = False  # q/k/v projections have biases (Qwen2-MoE; attention_bias of Qwen3/OLMoE)
    o_bias: bool = False  # o_proj has a bias (attention_bias of Qwen3/OLMoE)
    clip_qkv: float | None = None  # clamp q/k/v to +-clip_qkv after the projections (OLMoE)
    shared_expert_intermediate_size: int = 0  # > 0: a sigmoid-gated shared expert per MoE layer (Qwen2-MoE)
    mlp_only_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of experts (Qwen)
    decoder_sparse_step: int = 1  # layer i is MoE iff (i + 1) % step == 0 and i not in mlp_only_layers
    dense_intermediate_size: int = 0  # ffn width of the dense MLP layers

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        family = FAMILIES.get(model_type)
        if family is None:
            raise MoeOffloadError(
                f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(*fields: str) -> Any:
            for field in fields:
                if raw.get(field) is not None:
                    return raw[field]
            raise MoeOffloadError(f"{source}: required field {' or '.join(map(repr, fields))} is missing")

        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise MoeOffloadError(f"{source}: hidden_act {act!r} is not supported; only silu (SwiGLU experts) is")
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise MoeOffloadError(f"{source}: rope type {rope_type!r} is not supported; only default RoPE is")
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", family.rope_theta))
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        config = cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need(family.expert_size)),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            num_experts=int(need(*family.experts)),
            top_k=int(need("num_experts_per_tok")),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            sliding_window=_sliding_window(raw, family, source),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            norm_topk_prob=True if family.norm_topk_prob is None else bool(raw.get("norm_topk_prob",
                                                                                   family.norm_topk_prob)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            qk_norm=family.qk_norm,
            qkv_bias=bool(raw.get(*family.qkv_bias)) if family.qkv_bias else False,
            o_bias=bool(raw.get(family.o_bias, False)) if family.o_bias else False,
            clip_qkv=float(raw["clip_qkv"]) if family.clip_qkv and raw.get("clip_qkv") is not None else None,
            shared_expert_intermediate_size=int(need("shared_expert_intermediate_size")) if family.shared_expert else 0,
            mlp_only_layers=tuple(int(i) for i in raw.get("mlp_only_layers") or ()) if family.dense_layers else (),
            decoder_sparse_step=int(raw.get("decoder_sparse_step") or 1) if family.dense_layers else 1,
            dense_intermediate_size=int(raw.get("intermediate_size") or 0) if family.dense_layers else 0,
        )
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise MoeOffloadError(f"{path}: config.json not found; is this a model directory?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MoeOffloadError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise MoeOffloadError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, str(path))

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` routes to experts (else it has a dense MLP), as transformers decides."""
        return index not in self.mlp_only_layers and (index + 1) % self.decoder_sparse_step == 0

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the MoE layers; the offloading machinery numbers them 0, 1, ... in this order."""
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

    def validate(self, source: str = "config.json") -> None:
        if self.num_heads % self.num_kv_heads:
            raise MoeOffloadError(
                f"{source}: num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise MoeOffloadError(f"{source}: num_experts_per_tok {self.top_k} must be in 1..{self.num_experts}")
        if self.head_dim % 2:
            raise MoeOffloadError(f"{source}: head_dim {self.head_dim} must be even for RoPE")
        if self.qk_norm not in (None, *QK_NORMS):
            raise MoeOffloadError(f"{source}: qk_norm {self.qk_norm!r} must be one of {', '.join(QK_NORMS)} or None")
        if self.decoder_sparse_step < 1:
            raise MoeOffloadError(f"{source}: decoder_sparse_step {self.decoder_sparse_step} must be >= 1")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise MoeOffloadError(f"{source}: mlp_only_layers has {bad[0]}, outside layers 0..{self.num_layers - 1}")
        if not self.moe_layers:
            raise MoeOffloadError(f"{source}: no layer is a MoE layer (mlp_only_layers/decoder_sparse_step); "
                                  "dense models are not supported")
        if len(self.moe_layers) < self.num_layers and self.dense_intermediate_size <= 0:
            raise MoeOffloadError(f"{source}: required field 'intermediate_size' (the dense layers' MLP) is missing")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sliding_window(raw: dict[str, Any], family: Family, source: str) -> int | None:
    if family.sliding_switch is None:
        return raw.get("sliding_window") or None
    if raw.get(family.sliding_switch):
        # Qwen applies its window to some layers only (max_window_layers / layer_types): not implemented.
        raise MoeOffloadError(f"{source}: {family.sliding_switch}=true is not supported for {raw['model_type']}; "
                              "set it to false (the released checkpoints do)")
    return None
