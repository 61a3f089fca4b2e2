"""The composition root: ``load()`` wires config -> model -> weights -> tokenizer into an Engine.

Loading streams tensors from the checkpoint and routes each to its place in the model, so the model
is never held twice in memory. The CLI and the server are thin layers over ``load`` and ``Engine``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .config import ModelConfig
from .errors import MoeOffloadError
from .generate import ChatSession, Completion, Generation, Session
from .loading import EXPERT_KEY, find_checkpoint_files, iter_tensors, resolve_model_dir
from .model import MoeTransformer
from .sampling import SamplingParams
from .text import Tokenizer

# progress(description, completed, total): the CLI draws a bar with it; the API stays silent by default.
Progress = Callable[[str, int, int], None]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise MoeOffloadError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoeOffloadError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise MoeOffloadError(f"--device {device}: only cpu and cuda are supported")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise MoeOffloadError(f"--dtype {dtype!r} is not supported; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _module_path(canonical: str) -> str:
    """Canonical tensor name -> parameter path in MoeTransformer."""
    m = EXPERT_KEY.match(canonical)
    if m:
        layer, expert, proj = m.groups()
        return f"layers.{layer}.moe.experts.experts.{expert}.{proj}.weight"
    return canonical


def load_weights(model: MoeTransformer, directory: Path, device: torch.device, dtype: torch.dtype,
                 progress: Progress | None = None) -> None:
    """Fill a meta-device model with the checkpoint's tensors, one tensor at a time."""
    files = find_checkpoint_files(directory)
    total, done = len(files.weight_map), 0
    expected = dict(model.named_parameters())

    def on_read() -> None:
        nonlocal done
        done += 1
        if progress:
            progress("Loading weights", done, total)

    for name, tensor in iter_tensors(files, on_read):
        path = _module_path(name)
        if path not in expected:
            raise MoeOffloadError(f"{directory}: tensor {name!r} does not fit the architecture in config.json")
        want = expected[path].shape
        if tensor.shape != want:
            raise MoeOffloadError(
                f"{directory}: tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies {tuple(want)}"
            )
        module_path, _, attr = path.rpartition(".")
        module = model.get_submodule(module_path)
        setattr(module, attr, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise MoeOffloadError(
            f"{directory}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]!r}; "
            "the checkpoint is incomplete"
        )


@dataclass(frozen=True)
class LoadOptions:
    device: torch.device
    dtype: torch.dtype
    max_context: int


class Engine:
    """A loaded model ready to generate: ``engine.generate(...)``, ``engine.stream(...)``, ``engine.new_chat()``."""

    def __init__(self, config: ModelConfig, model: MoeTransformer, tokenizer: Tokenizer, directory: Path,
                 options: LoadOptions):
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.directory, self.options = directory, options
        eos = list(config.eos_token_ids)
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_ids = tuple(eos)
        self._session: Session | None = None  # reused by generate()/stream(): repeated prefixes are free

    @property
    def device(self) -> torch.device:
        return self.options.device

    @property
    def max_context(self) -> int:
        return self.options.max_context

    def _scratch(self) -> Session:
        if self._session is None:
            self._session = self.new_session()
        return self._session

    def new_session(self) -> Session:
        return Session(self.model, self.max_context)

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **overrides) -> Generation:
        """Generate from a plain prompt (text or token ids), streaming TokenEvents."""
        params = _params(params, overrides)
        return Generation(self._scratch(), self.tokenizer, self.encode(prompt), params, self.eos_ids)

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, **overrides) -> Completion:
        return self.stream(prompt, params, **overrides).result()

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, **overrides) -> Completion:
        """One assistant answer to a whole conversation (chat template applied)."""
        ids = self.tokenizer.apply_chat_template(messages)
        return Generation(self._scratch(), self.tokenizer, ids, _params(params, overrides), self.eos_ids).result()

    def new_chat(self, system: str | None = None) -> ChatSession:
        """A multi-turn conversation with its own KV cache, reused from turn to turn."""
        return ChatSession(self.new_session(), self.tokenizer, self.eos_ids, system=system)


def _params(params: SamplingParams | None, overrides: dict) -> SamplingParams:
    if params is None:
        return SamplingParams(**overrides)
    if overrides:
        from dataclasses import replace

        return replace(params, **overrides)
    return params


def load(model: str | os.PathLike, *, device: str | torch.device | None = "auto",
         dtype: str | torch.dtype | None = "auto", max_context: int = 4096, revision: str | None = None,
         progress: Progress | None = None) -> Engine:
    """Load MODEL (a local directory or a Hugging Face Hub repo id) for generation.

    ``max_context`` sizes the preallocated KV cache (capped at the model's max_position_embeddings).
    """
    directory = resolve_model_dir(model, revision)
    config = ModelConfig.from_file(directory / "config.json")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if max_context < 2:
        raise MoeOffloadError(f"--max-context {max_context} must be at least 2")
    options = LoadOptions(dev, dt, min(max_context, config.max_position_embeddings))
    tokenizer = Tokenizer(directory)
    with torch.device("meta"):
        net = MoeTransformer(config)
    load_weights(net, directory, dev, dt, progress)
    # Buffers and tables created after loading live on the target device.
    net.eval()
    return Engine(config, net, tokenizer, directory, options)
