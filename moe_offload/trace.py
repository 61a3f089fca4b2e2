"""Routing traces: which experts each token chose at each MoE layer, for replaying through cache policies.

Two on-disk formats are read (chosen by the first line):
- the shared ``# route_trace v1`` CSV (BigMoeOnEdge's schema; see shared/data/routing/README.md);
- our own JSON lines: a header object, then one object per token, written by ``write_trace`` (version 2;
  version 1 had neither ``weights`` nor ``guesses`` and is still read)::

    {"format": "moe_offload.route_trace", "version": 2, "num_layers": 3, "num_experts": 8, "top_k": 2,
     "source": "...", "expert_bytes": null, "weights": true, "lookahead": 2}
    {"phase": "prefill", "experts": [[3, 1], [0, 7], [2, 5]], "weights": [[0.6, 0.4], [0.5, 0.5], [0.9, 0.1]],
     "guesses": [[[], [0, 6], [2, 4]], [[], [], [2, 5]]]}

A layer a token skipped (llama.cpp computes the last layer only for prompt tokens that need logits) is an
empty list, so traces stay faithful instead of inventing routing. ``weights`` (optional) are the routing
weights applied, rank by rank. ``guesses`` (optional, ``lookahead`` = D > 0) are what speculative prefetch
would have copied: ``guesses[d - 1][l]`` is the top-k of layer l's router applied to the hidden state that
layer l - d's MoE block saw (the paper's Figure 2, right), [] where l < d.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from moe_offload.errors import MoeOffloadError

FORMAT = "moe_offload.route_trace"
VERSION = 2
READ_VERSIONS = (1, 2)
PHASES = ("prefill", "decode")
_CSV_MAGIC = "# route_trace v1"
_CSV_COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert", "weight", "residency", "expert_bytes")


@dataclass
class RoutingTrace:
    num_layers: int
    num_experts: int
    top_k: int
    steps: list[list[list[int]]]  # [token][layer] -> chosen experts in rank order ([] if the layer was skipped)
    phases: list[str | None] = field(default_factory=list)  # per token: "prefill", "decode" or None (unknown)
    source: str = ""
    expert_bytes: list[int] | None = None  # per layer, when the trace says (the CSV preamble does)
    weights: list[list[list[float]]] | None = None  # [token][layer] -> routing weights, rank by rank
    guesses: list[list[list[list[int]]]] | None = None  # [token][d - 1][layer] -> guessed d layers ahead

    def __post_init__(self) -> None:
        if not self.phases:
            self.phases = [None] * len(self.steps)
        assert len(self.phases) == len(self.steps), "one phase per step"
        assert self.weights is None or len(self.weights) == len(self.steps), "one weights entry per step"
        assert self.guesses is None or len(self.guesses) == len(self.steps), "one guesses entry per step"

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def lookahead(self) -> int:
        """How many layers ahead guesses were recorded (0: none)."""
        return len(self.guesses[0]) if self.guesses else 0

    def select(self, keep: Sequence[int]) -> RoutingTrace:
        """The tokens at indices ``keep``, with their phases, weights and guesses."""
        return replace(self, steps=[self.steps[i] for i in keep], phases=[self.phases[i] for i in keep],
                       weights=None if self.weights is None else [self.weights[i] for i in keep],
                       guesses=None if self.guesses is None else [self.guesses[i] for i in keep])

    def decode_only(self) -> RoutingTrace:
        """The decode tokens only: the published hit rates are measured on these, from a cold cache."""
        return self.select([i for i, p in enumerate(self.phases) if p == "decode"])


def check_matches(trace: RoutingTrace, num_layers: int, num_experts: int) -> None:
    """Raise if the trace was recorded on a model of another shape (its expert ids would be meaningless)."""
    if (trace.num_layers, trace.num_experts) != (num_layers, num_experts):
        raise MoeOffloadError(
            f"trace {trace.source or '<memory>'} has {trace.num_layers} layers x {trace.num_experts} experts "
            f"but the model has {num_layers} x {num_experts}; use a trace recorded with this model"
        )


def read_trace(path: str | os.PathLike) -> RoutingTrace:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MoeOffloadError(f"cannot read routing trace {path}: {e}") from e
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if first == _CSV_MAGIC:
        return _read_csv(path, lines)
    if first.startswith("{"):
        return _read_jsonl(path, lines)
    raise MoeOffloadError(
        f"{path}:1: unknown routing trace preamble {first[:40]!r}; expected '{_CSV_MAGIC}' or a JSON header "
        f"written by moe_offload"
    )


def write_trace(trace: RoutingTrace, path: str | os.PathLike) -> None:
    """Write our JSON-lines format atomically (temp file + rename), so a crash never leaves half a trace."""
    path = Path(path)
    header = {"format": FORMAT, "version": VERSION, "num_layers": trace.num_layers,
              "num_experts": trace.num_experts, "top_k": trace.top_k, "source": trace.source,
              "expert_bytes": trace.expert_bytes, "weights": trace.weights is not None,
              "lookahead": trace.lookahead}
    out = [json.dumps(header)]
    for i, (step, phase) in enumerate(zip(trace.steps, trace.phases)):
        rec: dict = {"phase": phase, "experts": step}
        if trace.weights is not None:
            rec["weights"] = [[round(float(w), 5) for w in ws] for ws in trace.weights[i]]
        if trace.guesses is not None:
            rec["guesses"] = trace.guesses[i]
        out.append(json.dumps(rec, separators=(",", ":")))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(out) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class TraceRecorder:
    """Collects the top-k indices the MoE layers report, one forward pass at a time (batch 1).

    A call for a layer not above the previous one starts a new forward pass. A pass is "prefill" if it has
    several tokens or is the first one, else "decode"; set ``phase`` to override that guess. ``weights``
    are kept when every call gives them; ``guesses`` (``{d: per-token experts guessed for layer + d}``)
    when ``lookahead`` > 0.
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, source: str = "recorded",
                 lookahead: int = 0):
        self.num_layers, self.num_experts, self.top_k, self.source = num_layers, num_experts, top_k, source
        self.lookahead = lookahead
        self.phase: str | None = None
        self._steps: list[list[list[int]]] = []
        self._phases: list[str | None] = []
        self._weights: list[list[list[float]]] = []
        self._guesses: list[list[list[list[int]]]] = []
        self._all_weights = True  # every call so far gave weights
        self._pass: list[list[list[int]]] = []  # [token][layer] of the forward pass being recorded
        self._pass_weights: list[list[list[float]]] = []  # [token][layer]
        self._pass_guesses: list[list[list[list[int]]]] = []  # [token][d - 1][layer]
        self._last_layer = -1

    def record(self, layer: int, experts: Sequence[Sequence[int]], weights: Sequence[Sequence[float]] | None = None,
               guesses: dict[int, Sequence[Sequence[int]]] | None = None) -> None:
        if layer <= self._last_layer:
            self._flush()
        if not self._pass:
            L, D = self.num_layers, self.lookahead
            self._pass = [[[] for _ in range(L)] for _ in experts]
            self._pass_weights = [[[] for _ in range(L)] for _ in experts]
            self._pass_guesses = [[[[] for _ in range(L)] for _ in range(D)] for _ in experts]
        assert len(experts) == len(self._pass), "every layer of a forward pass sees the same tokens"
        for t, chosen in enumerate(experts):
            self._pass[t][layer] = [int(e) for e in chosen]
        if weights is None:
            self._all_weights = False
        else:
            for t, ws in enumerate(weights):
                self._pass_weights[t][layer] = [float(w) for w in ws]
        for d, guessed in (guesses or {}).items():
            assert 1 <= d <= self.lookahead and layer + d < self.num_layers, f"no guess slot for {layer} + {d}"
            for t, g in enumerate(guessed):
                self._pass_guesses[t][d - 1][layer + d] = [int(e) for e in g]
        self._last_layer = layer

    def trace(self) -> RoutingTrace:
        self._flush()
        return RoutingTrace(self.num_layers, self.num_experts, self.top_k, list(self._steps), list(self._phases),
                            self.source, weights=list(self._weights) if self._all_weights and self._steps else None,
                            guesses=list(self._guesses) if self.lookahead else None)

    def _flush(self) -> None:
        if self._pass:
            phase = self.phase or ("prefill" if len(self._pass) > 1 or not self._steps else "decode")
            self._steps += self._pass
            self._phases += [phase] * len(self._pass)
            self._weights += self._pass_weights
            self._guesses += self._pass_guesses
        self._pass, self._pass_weights, self._pass_guesses, self._last_layer = [], [], [], -1


def _read_csv(path: Path, lines: list[str]) -> RoutingTrace:
    meta: dict[str, str] = {}
    layer_bytes: dict[int, int] = {}
    i = 1
    while i < len(lines) and lines[i].startswith("#"):
        fields = dict(kv.split("=", 1) for kv in lines[i][1:].split() if "=" in kv)
        if "layer" in fields and "expert_bytes" in fields:
            layer = _int(fields["layer"], path, i, "layer")
            layer_bytes[layer] = _int(fields["expert_bytes"], path, i, "expert_bytes")
        else:
            meta.update(fields)
        i += 1
    try:
        num_layers, num_experts, top_k = (int(meta[k]) for k in ("n_layer", "n_expert", "n_expert_used"))
    except (KeyError, ValueError):
        raise MoeOffloadError(f"{path}: preamble lacks integer n_layer, n_expert and n_expert_used") from None
    if i >= len(lines) or tuple(lines[i].strip().split(",")) != _CSV_COLUMNS:
        raise MoeOffloadError(f"{path}:{i + 1}: expected the CSV header {','.join(_CSV_COLUMNS)}")

    # (turn, step) -> (phase, [layer][slot] expert or -1, [layer][slot] weight); rows of a prefill batch come
    # layer by layer.
    tokens: dict[tuple[int, int], tuple[int, list[list[int]], list[list[float]]]] = {}
    for n in range(i + 1, len(lines)):
        line = lines[n].strip()
        if not line:
            continue
        cols = line.split(",")
        if len(cols) != len(_CSV_COLUMNS):
            raise MoeOffloadError(f"{path}:{n + 1}: expected {len(_CSV_COLUMNS)} columns, got {len(cols)}")
        try:
            turn, phase, step, layer, slot, expert = map(int, cols[:6])
            weight = float(cols[6])
        except ValueError:
            for c, name in zip(cols, _CSV_COLUMNS[:6]):
                _int(c, path, n, name)
            raise MoeOffloadError(f"{path}:{n + 1}: weight={cols[6]!r} is not a number") from None
        if not (0 <= phase < 2 and 0 <= layer < num_layers and 0 <= slot < top_k and 0 <= expert < num_experts):
            for name, value, hi in (("phase", phase, 2), ("layer", layer, num_layers), ("slot", slot, top_k),
                                    ("expert", expert, num_experts)):
                if not 0 <= value < hi:
                    raise MoeOffloadError(f"{path}:{n + 1}: {name}={value} is outside 0..{hi - 1}")
        token = tokens.get((turn, step))
        if token is None:
            token = tokens[turn, step] = (phase, [[-1] * top_k for _ in range(num_layers)],
                                          [[0.0] * top_k for _ in range(num_layers)])
        tok_phase, layers, weights = token
        if tok_phase != phase:
            raise MoeOffloadError(f"{path}:{n + 1}: step {step} appears as both prefill and decode")
        if layers[layer][slot] != -1:
            raise MoeOffloadError(f"{path}:{n + 1}: duplicate row for step {step} layer {layer} slot {slot}")
        layers[layer][slot] = expert
        weights[layer][slot] = weight

    steps, phases, all_weights = [], [], []
    for (turn, step), (phase, layers, weights) in sorted(tokens.items()):
        for layer, chosen in enumerate(layers):
            if -1 in chosen and chosen != [-1] * top_k:
                raise MoeOffloadError(f"{path}: step {step} layer {layer} has only some of its {top_k} experts")
        steps.append([[] if c[0] == -1 else c for c in layers])
        all_weights.append([[] if c[0] == -1 else w for c, w in zip(layers, weights)])
        phases.append(PHASES[phase])
    expert_bytes = [layer_bytes[l] for l in range(num_layers)] if len(layer_bytes) == num_layers else None
    return RoutingTrace(num_layers, num_experts, top_k, steps, phases, path.name, expert_bytes, weights=all_weights)


def _read_jsonl(path: Path, lines: list[str]) -> RoutingTrace:
    try:
        head = json.loads(lines[0])
        if head.get("format") != FORMAT or head.get("version") not in READ_VERSIONS:
            raise ValueError(f"not a {FORMAT} header of version {' or '.join(map(str, READ_VERSIONS))}")
        num_layers, num_experts, top_k = (int(head[k]) for k in ("num_layers", "num_experts", "top_k"))
        has_weights, lookahead = bool(head.get("weights", False)), int(head.get("lookahead", 0))
        if lookahead < 0:
            raise ValueError(f"lookahead {lookahead} is negative")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MoeOffloadError(f"{path}:1: bad routing trace header ({e})") from None
    steps, phases, weights, guesses = [], [], [], []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            layers, phase = rec["experts"], rec.get("phase")
            if phase not in (*PHASES, None):
                raise ValueError(f"phase {phase!r} is not prefill, decode or null")
            _check_layers(layers, num_layers, num_experts, top_k)
            if has_weights:
                ws = rec["weights"]
                if not isinstance(ws, list) or [len(w) for w in ws] != [len(c) for c in layers]:
                    raise ValueError("weights must match experts, layer by layer")
                if any(not isinstance(w, (int, float)) for row in ws for w in row):
                    raise ValueError("weights must be numbers")
                weights.append(ws)
            if lookahead:
                gs = rec["guesses"]
                if not isinstance(gs, list) or len(gs) != lookahead:
                    raise ValueError(f"expected guesses for {lookahead} layers ahead")
                for g in gs:
                    _check_layers(g, num_layers, num_experts, None)
                guesses.append(gs)
        except KeyError as e:
            raise MoeOffloadError(f"{path}:{n}: bad routing step (no {e.args[0]!r} field)") from None
        except (ValueError, TypeError) as e:
            raise MoeOffloadError(f"{path}:{n}: bad routing step ({e})") from None
        steps.append(layers)
        phases.append(phase)
    eb = head.get("expert_bytes")
    # source names the file read, so errors point at it (the header keeps where it was recorded).
    return RoutingTrace(num_layers, num_experts, top_k, steps, phases, path.name, eb,
                        weights=weights if has_weights else None, guesses=guesses if lookahead else None)


def _check_layers(layers, num_layers: int, num_experts: int, top_k: int | None) -> None:
    """[layer] -> distinct expert ids in 0..E-1: 0 or ``top_k`` of them (any number if ``top_k`` is None)."""
    if not isinstance(layers, list) or len(layers) != num_layers:
        raise ValueError(f"expected {num_layers} layers")
    for chosen in layers:
        if (not isinstance(chosen, list) or (top_k is not None and len(chosen) not in (0, top_k))
                or len(set(chosen)) != len(chosen)):
            what = "distinct experts" if top_k is None else f"0 or {top_k} distinct experts"
            raise ValueError(f"a layer lists {chosen}; expected {what}")
        if any(not isinstance(e, int) or not 0 <= e < num_experts for e in chosen):
            raise ValueError(f"expert ids {chosen} outside 0..{num_experts - 1}")


def _int(text: str, path: Path, line: int, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise MoeOffloadError(f"{path}:{line + 1}: {name}={text!r} is not an integer") from None
