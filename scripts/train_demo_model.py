"""Train moe-offload's demo model: a small Mixtral (8 experts, top-2) on English documentation, in minutes on one GPU.

    python scripts/prepare_demo_corpus.py --out .demo_corpus          # once, where apt-get works
    python scripts/train_demo_model.py --corpus .demo_corpus --minutes 8 --out demo_model \
        --eval-text wikitext-2-test.txt

Steps: a byte-level BPE tokenizer (``tokenizers``) with special tokens and a chat template; documents and chat
examples made from titled sections (user asks about a section's title, the assistant answers with its text);
transformers' MixtralForCausalLM trained with the router's load-balancing loss, bf16 autocast, AdamW and a cosine
schedule over the wall-clock budget ``--minutes``; the checkpoint with the best loss on the corpus's ``valid``
split is kept, saved in bfloat16 as a Hugging Face checkpoint, reloaded, and scored (sliding-window perplexity) on
``test`` and every ``--eval-text``. ``README.md`` in ``--out`` is the model card. Everything after the deadline
(final scoring, saving) takes well under a minute on a GPU. The corpus directory holds ``train.jsonl``,
``valid.txt``, ``test.txt`` and ``manifest.json`` (see prepare_demo_corpus.py). Never imported by the package.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package beside this script, installed or not
from moe_offload.evaluate import windows as sliding_windows  # noqa: E402 (the windows `moe-offload perplexity` uses)

EOS = "<|endoftext|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [EOS] + [f"<|{r}|>" for r in ROLES]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
QUESTIONS = ["Tell me about {t}.", "What is {t}?", "Explain {t}.", "Can you describe {t}?", "{t}?",
             "What does the documentation say about {t}?", "I have a question about {t}.", "Summarize {t}."]
SYSTEM = "You are a helpful assistant who answers from the Python and Linux documentation."

SIZES = {  # the defaults: ~12M parameters, under 25 MB in bfloat16
    "demo": dict(hidden=256, layers=4, experts=8, top_k=2, intermediate=384, heads=4, kv_heads=2, vocab_size=8192,
                 seq_len=2048, batch_size=16),
    "tiny": dict(hidden=64, layers=2, experts=4, top_k=2, intermediate=128, heads=4, kv_heads=2, vocab_size=400,
                 seq_len=64, batch_size=8),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--corpus", type=Path, default=Path(".demo_corpus"), help="train.jsonl, valid.txt, test.txt")
    p.add_argument("--out", type=Path, required=True, help="Directory to write the checkpoint and model card to.")
    p.add_argument("--eval-text", type=Path, action="append", default=[], help="More held-out text to score "
                   "at the end (repeatable), e.g. wikitext-2-test.txt. Never trained on.")
    p.add_argument("--minutes", type=float, default=8.0, help="Wall-clock budget from start to the end of training.")
    p.add_argument("--max-steps", type=int, default=None, help="Stop after this many steps (tests, smoke runs).")
    p.add_argument("--tiny", action="store_true", help="A tiny model (CPU smoke tests).")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    for name, value in SIZES["demo"].items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {value} (tiny: "
                       f"{SIZES['tiny'][name]})")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100, help="Warm-up steps.")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="Weight of the router's load-balancing loss.")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--chat-fraction", type=float, default=0.3, help="Share of titled sections also given as chat.")
    p.add_argument("--tokenizer-sample", type=int, default=3, help="Train the tokenizer on every Nth document.")
    p.add_argument("--eval-every", type=float, default=30.0, help="Seconds between scorings of valid.")
    p.add_argument("--valid-tokens", type=int, default=131072, help="Tokens of valid scored during training.")
    p.add_argument("--context", type=int, default=512, help="Final scoring: sliding-window context.")
    p.add_argument("--stride", type=int, default=256, help="Final scoring: sliding-window stride.")
    p.add_argument("--experts-impl", default="auto", help="transformers' experts implementation: auto (time "
                   "grouped_mm and eager, keep the faster that works), grouped_mm, eager.")
    args = p.parse_args(argv)
    for name, value in SIZES["tiny" if args.tiny else "demo"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# --- data -----------------------------------------------------------------------------------------------

def load_corpus(directory: Path) -> tuple[list[dict], dict]:
    train = directory / "train.jsonl"
    if not train.is_file():
        raise SystemExit(f"error: {train} is missing; make the corpus with scripts/prepare_demo_corpus.py")
    docs = [json.loads(line) for line in train.read_text(encoding="utf-8").splitlines() if line.strip()]
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return docs, manifest


def render(doc: dict) -> str:
    """A document as plain text: '# Title', '## Section' headings and paragraphs (as valid.txt and test.txt are)."""
    parts = [f"# {doc['title']}"]
    for s in doc["sections"]:
        if s["title"] and s["title"] != doc["title"]:
            parts.append(f"## {s['title']}")
        if s["text"]:
            parts.append(s["text"])
    return "\n\n".join(parts)


def chat_examples(docs: list[dict], fraction: float, rng: random.Random) -> list[list[dict]]:
    """Conversations from titled sections: the user asks about the title, the assistant answers with the text."""
    out = []
    for doc in docs:
        for s in doc["sections"]:
            if not s["title"] or not 80 <= len(s["text"]) <= 4000 or rng.random() >= fraction:
                continue
            topic = s["title"] if s["title"] == doc["title"] else f"{s['title']} ({doc['title']})"
            messages = [{"role": "user", "content": rng.choice(QUESTIONS).format(t=topic)},
                        {"role": "assistant", "content": s["text"]}]
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": SYSTEM})
            out.append(messages)
    return out


def train_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, chat_template=CHAT_TEMPLATE,
                                   model_max_length=max_length)


def encode_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """Texts as one token stream (special tokens written in the text, like <|endoftext|>, become their ids)."""
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.int32)


# --- model ----------------------------------------------------------------------------------------------

def make_config(args, vocab_size: int, eos_id: int):
    import inspect

    from transformers import MixtralConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                  max_position_embeddings=args.seq_len, tie_word_embeddings=True, bos_token_id=None,
                  eos_token_id=eos_id, pad_token_id=eos_id, router_aux_loss_coef=args.aux_loss_coef,
                  initializer_range=0.02, rms_norm_eps=1e-5, sliding_window=None)
    if "rope_parameters" in inspect.signature(MixtralConfig.__init__).parameters:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": args.rope_theta}
    else:
        kwargs["rope_theta"] = args.rope_theta
    return MixtralConfig(**kwargs)


def set_experts_impl(model, name: str) -> None:
    for module in model.modules():  # every module's config (one object today; copies would miss the change)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = name


def experts_impl(model) -> str:
    return str(getattr(model.config, "_experts_implementation", None) or "eager")


def pick_experts_impl(model, batch, autocast, requested: str, device: torch.device) -> str:
    """Time one forward+backward of each experts implementation that works; keep the fastest."""
    default = experts_impl(model)
    if requested != "auto":
        set_experts_impl(model, requested)
        return requested
    timings = {}
    # Not batched_mm: it gathers a copy of the expert weights per token (tens of GB at a training batch).
    for name in dict.fromkeys([default, "grouped_mm", "eager"]):
        try:
            set_experts_impl(model, name)
            for k in range(3):  # one warm-up, then two timed
                if k == 1:
                    sync(device)
                    t0 = time.perf_counter()
                with autocast():
                    loss = model(input_ids=batch, labels=batch, output_router_logits=True).loss
                loss.backward()
            sync(device)
            timings[name] = (time.perf_counter() - t0) / 2
        except Exception as e:  # an implementation this torch/transformers/GPU lacks: skip it
            print(f"experts implementation {name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        finally:
            model.zero_grad(set_to_none=True)
    if not timings:
        raise SystemExit("error: no experts implementation of transformers ran a training step")
    best = min(timings, key=timings.get)
    print("experts implementation: " + ", ".join(f"{k} {v * 1000:.0f} ms/step" for k, v in timings.items())
          + f" -> {best}")
    set_experts_impl(model, best)
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- scoring --------------------------------------------------------------------------------------------

@torch.no_grad()
def mean_loss(model, ids: torch.Tensor, seq_len: int, batch_size: int, autocast, max_tokens: int) -> float:
    """Mean next-token loss over non-overlapping windows (the quick check of valid during training)."""
    seq_len = min(seq_len, len(ids))
    n = max(1, min(len(ids), max_tokens) // seq_len)
    windows = ids[: n * seq_len].view(n, seq_len).long()
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i : i + batch_size]
        with autocast():
            logits = model(input_ids=x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total, count = total + float(nll), count + x[:, 1:].numel()
    return total / max(count, 1)


@torch.no_grad()
def perplexity(model, ids: list[int], context: int, stride: int, device: torch.device, batch_size: int = 16) -> dict:
    """Sliding-window perplexity in float32 (the HF perplexity guide's windows; exact token-weighted mean)."""
    t = torch.tensor(ids, dtype=torch.long, device=device)
    windows = sliding_windows(len(ids), context, stride)
    nll, count = 0.0, 0
    groups: dict[int, list] = {}
    for w in windows:
        groups.setdefault(w[1] - w[0], []).append(w)
    for length, group in groups.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            x = torch.stack([t[b:e] for b, e, _ in chunk])
            logp = torch.log_softmax(model(input_ids=x).logits.float(), dim=-1)  # [B, S, V]
            token_nll = -logp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]  # [B, S-1]: predicts positions 1..S-1
            for row, (b, e, first) in enumerate(chunk):
                nll += float(token_nll[row, first - b - 1 :].double().sum())
                count += e - first
    return {"perplexity": math.exp(nll / count), "tokens": count, "context": context, "stride": stride}


# --- training -------------------------------------------------------------------------------------------

def lr_at(args, step: int, progress: float) -> float:
    warm = min(1.0, (step + 1) / args.warmup)
    cosine = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * cosine


def count_params(model) -> tuple[int, int]:
    """(total, active per token) parameters, tied embeddings counted once."""
    total = sum(p.numel() for p in model.parameters())
    c = model.config
    expert = 3 * c.hidden_size * c.intermediate_size
    active = total - c.num_hidden_layers * (c.num_local_experts - c.num_experts_per_tok) * expert
    return total, active


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.time()
    deadline = start + 60 * args.minutes
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    docs, manifest = load_corpus(args.corpus)
    texts = [render(d) for d in docs]
    tokenizer = train_tokenizer(texts[:: args.tokenizer_sample], args.vocab_size, args.seq_len)
    chats = chat_examples(docs, args.chat_fraction, rng)
    # Documents end with EOS; the chat template ends every message with it already.
    examples = [t + EOS for t in texts] + [tokenizer.apply_chat_template(m, tokenize=False) for m in chats]
    rng.shuffle(examples)
    data = encode_stream(tokenizer, examples).to(device)
    valid = encode_stream(tokenizer, [(args.corpus / "valid.txt").read_text(encoding="utf-8")]).to(device)
    vocab = len(tokenizer)
    print(f"corpus: {len(docs)} documents + {len(chats)} chat examples -> {len(data):,} training tokens, "
          f"{len(valid):,} valid tokens; vocab {vocab} ({time.time() - start:.1f} s)")

    from transformers import MixtralForCausalLM

    config = make_config(args, vocab, tokenizer.eos_token_id)
    model = MixtralForCausalLM(config).to(device)
    model.train()
    total, active = count_params(model)
    print(f"model: {total / 1e6:.2f}M parameters ({active / 1e6:.2f}M active per token), "
          f"{2 * total / 2**20:.1f} MiB in bfloat16")
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    span = args.seq_len

    def batch() -> torch.Tensor:
        starts = torch.randint(0, len(data) - span, (args.batch_size,), device=device)
        return data[starts[:, None] + torch.arange(span, device=device)].long()  # [B, S]

    impl = pick_experts_impl(model, batch(), autocast, args.experts_impl, device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                                  eps=1e-8, **({"fused": True} if device.type == "cuda" else {}))

    train_start = time.time()
    budget = max(deadline - train_start, 1.0)
    step, tokens, best, best_state, history = 0, 0, float("inf"), None, []
    next_eval, last_log, log_tokens = train_start + args.eval_every, train_start, 0
    while True:
        now = time.time()
        progress = (now - train_start) / budget
        if args.max_steps is not None:
            progress = max(progress, step / args.max_steps)
        done = now >= deadline or (args.max_steps is not None and step >= args.max_steps)
        if done or now >= next_eval:
            model.eval()
            loss = mean_loss(model, valid, args.seq_len, args.batch_size, autocast, args.valid_tokens)
            model.train()
            history.append({"step": step, "minutes": round((time.time() - train_start) / 60, 2),
                            "valid_loss": round(loss, 4)})
            mark = ""
            if loss < best:
                best, mark = loss, " (best)"
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            print(f"step {step}: valid loss {loss:.3f}, perplexity {math.exp(loss):.2f}{mark}")
            next_eval = time.time() + args.eval_every
            if done:
                break
        lr = lr_at(args, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = batch()
        with autocast():
            out = model(input_ids=x, labels=x, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += x.numel()
        log_tokens += x.numel()
        if step % 50 == 0 or step == args.max_steps:
            sync(device)
            t = time.time()
            aux = float(out.aux_loss.detach()) if getattr(out, "aux_loss", None) is not None else float("nan")
            lm = float(out.loss.detach()) - args.aux_loss_coef * aux
            print(f"step {step}: loss {lm:.3f}, router aux {aux:.3f}, lr {lr:.2e}, "
                  f"{log_tokens / (t - last_log):,.0f} tok/s, {(t - train_start) / 60:.1f} min")
            last_log, log_tokens = t, 0
    train_s = time.time() - train_start
    best_step = min(history, key=lambda h: h["valid_loss"])["step"]
    print(f"trained {step} steps, {tokens:,} tokens ({tokens / len(data):.1f} epochs) in {train_s / 60:.2f} min, "
          f"{tokens / train_s:,.0f} tok/s; keeping step {best_step} (valid loss {best:.3f})")

    model.load_state_dict(best_state)
    save(model, tokenizer, args.out)
    del model, optimizer, best_state
    scores = evaluate(args, device)
    card = dict(args=args, manifest=manifest, docs=len(docs), chats=len(chats), train_tokens=len(data),
                valid_tokens=len(valid), vocab=vocab, total=total, active=active, steps=step, tokens=tokens,
                train_s=train_s, best_step=best_step, history=history, scores=scores, impl=impl, device=device,
                wall_s=time.time() - start)
    write_card(args.out, card)
    print(f"wrote {args.out} in {(time.time() - start) / 60:.2f} min")


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.config.use_cache = True
    model.to(torch.bfloat16).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    # One tokenizer_config.json that transformers 4.45+ and 5.x read alike: the class name every version knows and
    # the chat template inside (newer versions write it to chat_template.jinja instead).
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)


def window(args) -> tuple[int, int]:
    """The final scoring's (context, stride): the model's context at most, stride below it."""
    context = min(args.context, args.seq_len)
    return context, args.stride if args.stride < context else context // 2


def evaluate(args, device: torch.device) -> dict:
    """Reload the saved checkpoint (bfloat16 weights), score in float32: what users of the checkpoint get."""
    from transformers import AutoTokenizer, MixtralForCausalLM

    model = MixtralForCausalLM.from_pretrained(str(args.out), dtype=torch.float32).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(args.out))
    texts = {"valid": args.corpus / "valid.txt", "test": args.corpus / "test.txt"}
    texts.update({p.name: p for p in args.eval_text})
    scores = {}
    for name, path in texts.items():
        ids = tokenizer.encode(path.read_text(encoding="utf-8"))
        context, stride = window(args)
        result = perplexity(model, ids, context, stride, device)
        scores[name] = {"file": path.name, **result}
        print(f"perplexity on {name} ({path.name}): {result['perplexity']:.3f} over {result['tokens']:,} tokens")
    return scores


def write_card(out: Path, c: dict) -> None:
    args, m = c["args"], c["manifest"]
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    device = torch.cuda.get_device_name(c["device"]) if c["device"].type == "cuda" else platform.processor() or "CPU"
    packages = m.get("packages", [])
    data_lines = "\n".join(f"- `{p['name']}` {p['version']} (Debian bookworm), licence {p['licence']}: "
                           f"the reStructuredText sources of its HTML documentation, `{p['files']}`." for p in packages)
    precision = "bfloat16 autocast" if c["device"].type == "cuda" else "float32"
    score_rows = "\n".join(f"| {name} | `{s['file']}` | {s['tokens']:,} | {s['perplexity']:.2f} |"
                           for name, s in c["scores"].items())
    text = f"""# moe-offload demo model

A small Mixture-of-Experts language model with the Mixtral architecture, trained from scratch in minutes so that
`moe-offload chat`, `generate`, `bench`, `serve` and `perplexity` have a real model to run with no download.
It writes documentation-flavoured English and answers questions in the style of the docs it read. It knows
little and often makes things up: it is a demo of the machinery (real routing, real perplexity), not an assistant.

## Data

English technical documentation from Debian packages, installable offline with `apt-get install`:

{data_lines or "- (no manifest.json beside the corpus)"}

Markup, code and literal blocks, doctests and tables are stripped (`scripts/prepare_demo_corpus.py`); translations
are left out. Held-out split: {m.get("held_out", "see the corpus manifest")} (one document in 20 is held out). Training documents: {c["docs"]:,}, plus {c["chats"]:,} chat examples made from titled sections
of the training documents (user: a question about the section's title; assistant: the section's text).
Training stream: {c["train_tokens"]:,} tokens. WikiText-2 was never trained on.

The weights are a model trained on this text; the licences above are those of the text. If you redistribute the
weights, check that they suit you.

## Model

- Architecture: `MixtralForCausalLM` ({args.layers} layers, hidden {args.hidden}, {args.heads} heads with
  {args.kv_heads} key/value heads, {args.experts} experts of width {args.intermediate}, top-{args.top_k}, RoPE theta
  {args.rope_theta:g}, context {args.seq_len}, tied input/output embeddings).
- Parameters: {c["total"] / 1e6:.2f}M, of which {c["active"] / 1e6:.2f}M active per token.
- Tokenizer: byte-level BPE trained on this corpus with `tokenizers`, vocabulary {c["vocab"]}; special tokens
  {", ".join(f"`{t}`" for t in SPECIAL_TOKENS)}; `<|endoftext|>` ends documents and turns. Chat template:
  `<|role|>\\ncontent<|endoftext|>\\n` per message, then `<|assistant|>\\n`.
- Files: `model.safetensors` in bfloat16 ({size / 2**20:.1f} MiB), `config.json`, `tokenizer.json`,
  `tokenizer_config.json`. transformers loads them as they are; so does `moe_offload.load`.

## Training

- Device: {device}; torch {torch.__version__}; transformers experts implementation `{c["impl"]}`.
- {c["steps"]:,} steps of {args.batch_size} x {args.seq_len} tokens: {c["tokens"]:,} tokens
  ({c["tokens"] / c["train_tokens"]:.1f} passes over the stream) in {c["train_s"] / 60:.1f} minutes
  ({c["tokens"] / c["train_s"]:,.0f} tokens/s); {c["wall_s"] / 60:.1f} minutes for the whole script.
- AdamW (betas 0.9/0.95, weight decay {args.weight_decay}), peak learning rate {args.lr:g}, {args.warmup} warm-up
  steps, cosine decay to {args.min_lr_ratio:g}x over the time budget, gradient clipping 1.0, {precision},
  router load-balancing loss weight {args.aux_loss_coef:g}.
- Kept: the step with the lowest loss on `valid` (step {c["best_step"]:,}; scored every {args.eval_every:g} s).
- Command: `python scripts/train_demo_model.py --corpus CORPUS --minutes {args.minutes:g} --out OUT`
  {" ".join(f"--eval-text {p.name}" for p in args.eval_text)} (seed {args.seed}).

## Held-out perplexity

Sliding window of {window(args)[0]} tokens with stride {window(args)[1]} (each token
scored once), bfloat16 weights computed in float32, per token of this model's tokenizer (so not comparable with
other models' perplexities). `moe-offload perplexity` measures the same way; quantized numbers are in the
project's BENCHMARKS.md.

| text | file | tokens | perplexity |
|---|---|---|---|
{score_rows}
"""
    (out / "README.md").write_text(text)
    stats = {k: c[k] for k in ("docs", "chats", "train_tokens", "valid_tokens", "vocab", "total", "active", "steps",
                               "tokens", "best_step", "history", "scores", "impl")}
    stats.update(train_s=round(c["train_s"], 1), wall_s=round(c["wall_s"], 1), device=device,
                 args={k: str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v
                       for k, v in vars(args).items()})
    (out / "training.json").write_text(json.dumps(stats, indent=1) + "\n")


if __name__ == "__main__":
    main()
