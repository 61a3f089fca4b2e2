"""ModelConfig: the architecture facts the model code needs, read from a checkpoint's config.json.

Each difference between MoE families is one explicit field here; the model has one branch for it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import MoeOffloadError

SUPPORTED_MODEL_TYPES = ("mixtral",)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # per expert
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

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise MoeOffloadError(
                f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(field: str) -> Any:
            if raw.get(field) is None:
                raise MoeOffloadError(f"{source}: required field {field!r} is missing")
            return raw[field]

        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise MoeOffloadError(f"{source}: rope type {rope_type!r} is not supported; only default RoPE is")
        rope_theta = rope.get("rope_theta", raw.get("rope_theta", 1e6))
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        config = cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            num_experts=int(need("num_local_experts")),
            top_k=int(need("num_experts_per_tok")),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            sliding_window=raw.get("sliding_window") or None,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
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

    def validate(self, source: str = "config.json") -> None:
        if self.num_heads % self.num_kv_heads:
            raise MoeOffloadError(
                f"{source}: num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise MoeOffloadError(f"{source}: num_experts_per_tok {self.top_k} must be in 1..{self.num_experts}")
        if self.head_dim % 2:
            raise MoeOffloadError(f"{source}: head_dim {self.head_dim} must be even for RoPE")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
