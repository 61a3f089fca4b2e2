"""The `moe-offload` command: a thin typer/rich skin over ``moe_offload.load`` and ``Engine``."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .errors import MoeOffloadError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run Mixture-of-Experts language models fast on GPUs that cannot hold them.")
err = Console(stderr=True)
# Wide enough for bench's table on one line per run. Rich sizes a console that is not a terminal (a log, a pipe) at
# 80 columns, which wrapped every label over several lines; a terminal keeps its own width.
TABLE_WIDTH = 200


def _table_console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=TABLE_WIDTH)


def user_errors(fn):
    """Turn MoeOffloadError into one line on stderr and exit code 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoeOffloadError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


class _ProgressBar:
    """progress(description, done, total) callback drawing one rich bar per description."""

    def __init__(self):
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), console=err, transient=True)
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        self._bar.__exit__(*exc)

    def __call__(self, description: str, done: int, total: int) -> None:
        if description not in self._tasks:
            self._tasks[description] = self._bar.add_task(description, total=total)
        self._bar.update(self._tasks[description], completed=done, total=total)


def _load(model: str, device: str, dtype: str, max_context: int, quantize: str | None, verify: bool,
          offload=None, int8_activations: bool = False):
    from .engine import load

    with _ProgressBar() as progress:
        engine = load(model, device=device, dtype=dtype, max_context=max_context, quantize=quantize, verify=verify,
                      offload=offload, int8_activations=int8_activations, progress=progress)
    if engine.plan is not None:
        err.print(f"[dim]{engine.plan}[/]", highlight=False)
    if engine.hybrid is not None:
        h = engine.hybrid
        split = f"; misses split within experts ({h.split.quantum}-unit steps)" if h.split is not None else ""
        err.print(f"[dim]{'CPU experts':<20}hybrid on, {h.threads} threads; copy {h.cost.copy_ms:.2f} ms vs CPU "
                  f"{h.cost.cpu_call_ms(1):.2f} ms per expert; extra host memory 0 B (reads the expert store in place)"
                  f"{split}[/]", highlight=False)
    return engine


def _model(model: str | None, hint: str = "pass MODEL (a model directory or Hugging Face Hub repo id)") -> str:
    """MODEL as given, or the directory of the demo model shipped inside the package when none is."""
    if model is not None:
        return model
    from .demo import demo_model_dir

    return str(demo_model_dir(hint))


def _offload(gpu_memory, offload_per_layer, policy, prefetch, no_pin, hybrid="auto", cpu_threads=None, cpu_layers=0,
             device_lookup="auto", serve_cpu_layers="auto"):
    from .placement import OffloadOptions, parse_cpu_layers

    return OffloadOptions(gpu_memory=gpu_memory, offload_per_layer=offload_per_layer, policy=policy,
                          prefetch=prefetch, pin=not no_pin, hybrid=hybrid, cpu_threads=cpu_threads,
                          cpu_layers=parse_cpu_layers(cpu_layers), device_lookup=device_lookup,
                          serve_cpu_layers=serve_cpu_layers)


def _cache_summary(engine) -> dict:
    if engine.cache_stats is None:  # everything resident: nothing is ever copied
        return {"hit_rate": 1.0, "prefetch_recall": 0.0, "bytes_copied_per_token": 0.0, "cpu_experts_per_token": 0.0,
                "split_experts_per_token": 0.0}
    engine.expert_cache.collect_timing()  # what ran without the host (served CPU layers) is counted now
    s = engine.cache_stats.summary()
    return {k: s[k] for k in ("hit_rate", "prefetch_recall", "prefetch_precision", "bytes_copied_per_token",
                              "host_syncs_per_token", "cpu_experts_per_token", "cpu_ms_per_token",
                              "in_place_per_token", "split_experts_per_token")}


def _params(temperature, top_p, top_k, max_new_tokens, seed, stop):
    from .sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens,
                          seed=seed, stop=tuple(stop or ()))


ModelArg = typer.Argument(..., help="Model directory or Hugging Face Hub repo id.")
DefaultModel = typer.Argument(None, help="Model directory or Hugging Face Hub repo id (default: the small demo model "
                              "shipped with moe-offload).", show_default=False)
Temperature = typer.Option(0.9, help="Sampling temperature; 0 means greedy.")
TopP = typer.Option(0.9, "--top-p", help="Nucleus sampling mass.")
TopK = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0: off).")
MaxNew = typer.Option(512, "--max-new-tokens", help="Most tokens to generate.")
Seed = typer.Option(None, help="Random seed, for reproducible sampling.")
Device = typer.Option("auto", help="auto, cpu, cuda or cuda:N.")
Dtype = typer.Option("auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16.")
MaxContext = typer.Option(4096, "--max-context", help="Context window (prompt + answer) to allocate.")
Stop = typer.Option(None, "--stop", help="Stop when this text appears (repeatable).")
Quantize = typer.Option(None, "--quantize", help="Quantize an unquantized checkpoint while loading: 4/2, 4/2-lean, 4/3, 4/4, 8/8.")
NoVerify = typer.Option(False, "--no-verify", help="Skip the checksums of a quantized checkpoint (faster).")
GpuMemory = typer.Option(None, "--gpu-memory", help="GPU memory budget, e.g. 12GiB (default: free memory minus 1 GiB); "
                         "experts that do not fit are offloaded to host memory.")
OffloadPerLayer = typer.Option(None, "--offload-per-layer", help="Keep this many experts per layer off the GPU.")
Policy = typer.Option("lru", "--policy", help="Expert cache policy: lru (per layer), global-lru, lfu.")
Prefetch = typer.Option(0, "--prefetch", help="Layers ahead to guess and prefetch experts for (0: off, the "
                        "default: measured faster when copies set the pace).")
NoPin = typer.Option(False, "--no-pin", help="Keep offloaded experts in pageable memory (slower copies).")
Hybrid = typer.Option("auto", "--hybrid", help="Compute some decode cache misses on the CPU while others are "
                      "copied: off (bit-exact), auto (on with a CUDA GPU), on.")
CpuThreads = typer.Option(None, "--cpu-threads", help="Threads for CPU experts (default: all cores but one).")
CpuLayers = typer.Option("0", "--cpu-layers", help="Compute the experts of this many MoE layers (spread over the "
                         "depth) on the CPU at decode and give their GPU memory to the other layers' caches, like "
                         "llama.cpp's --n-cpu-moe (not exact; needs the CPU path, i.e. not --hybrid off). auto: as many "
                         "as the GPU budget calls for, where the CPU kernel is fast (the 4/2 preset's experts); "
                         "elsewhere all of them where no cache fits (their experts then only stream through the GPU).")
DeviceLookup = typer.Option("auto", "--device-lookup", help="With --cpu-layers, the layers between CPU layers find "
                            "their experts on the GPU and read misses in place over PCIe, so a decode step reaches the "
                            "host only at CPU layers: off, auto (on with a CUDA GPU and pinned memory where the cached "
                            "layers keep at least 85% of their experts), on (bench: also runs off beside it). Exact "
                            "either way.")
ServeCpuLayers = typer.Option("auto", "--serve-cpu-layers", help="With --cpu-layers, a C thread serves the CPU "
                              "layers at decode as the GPU signals it, with no Python or host sync between layers (a "
                              "decode step is one CUDA graph); it computes some of their experts where the fused 4/2 "
                              "CPU kernel runs, and where it does not (4/3) it only copies every expert, so that 4/3 "
                              "runs where no cache fits: off, auto (on with a CUDA GPU where the other layers hold all "
                              "their experts), on (auto, and an error where it cannot run).")
Int8Activations = typer.Option(False, "--int8-activations", help="At decode, round the inputs of 2-, 3- and 4-bit "
                               "experts to int8 per block of 32, as llama.cpp does: faster decode on CUDA, expert "
                               "outputs about 1% different (not exact).")


@app.command()
@user_errors
def generate(
    model: Optional[str] = DefaultModel,
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object instead of the text."),
    temperature: float = Temperature, top_p: float = TopP, top_k: int = TopK, max_new_tokens: int = MaxNew,
    seed: Optional[int] = Seed, stop: Optional[list[str]] = Stop, device: str = Device, dtype: str = Dtype,
    max_context: int = MaxContext, quantize: Optional[str] = Quantize, no_verify: bool = NoVerify,
    gpu_memory: Optional[str] = GpuMemory, offload_per_layer: Optional[int] = OffloadPerLayer,
    policy: str = Policy, prefetch: int = Prefetch, no_pin: bool = NoPin,
    hybrid: str = Hybrid, cpu_threads: Optional[int] = CpuThreads, cpu_layers: str = CpuLayers,
    device_lookup: str = DeviceLookup, serve_cpu_layers: str = ServeCpuLayers,
    int8_activations: bool = Int8Activations,
):
    """Continue a prompt and print the completion."""
    params = _params(temperature, top_p, top_k, max_new_tokens, seed, stop)
    engine = _load(_model(model), device, dtype, max_context, quantize, not no_verify,
                   _offload(gpu_memory, offload_per_layer, policy, prefetch, no_pin, hybrid, cpu_threads, cpu_layers,
                            device_lookup, serve_cpu_layers), int8_activations)
    generation = engine.stream(prompt, params)
    if json_out:
        c = generation.result()
        print(json.dumps({
            "text": c.text, "tokens": c.tokens, "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens, "finish_reason": c.finish_reason,
            "prefill_tok_s": round(c.prefill_tok_s, 3), "decode_tok_s": round(c.decode_tok_s, 3),
            **_cache_summary(engine),
        }))
        return
    for event in generation:
        sys.stdout.write(event.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    c = generation.completion
    err.print(f"[dim]{c.prompt_tokens} prompt tokens at {c.prefill_tok_s:.1f} tok/s, "
              f"{c.completion_tokens} generated at {c.decode_tok_s:.1f} tok/s ({c.finish_reason})[/]")


@app.command()
@user_errors
def chat(
    model: Optional[str] = DefaultModel,
    system: Optional[str] = typer.Option(None, help="System prompt."),
    temperature: float = Temperature, top_p: float = TopP, top_k: int = TopK, max_new_tokens: int = MaxNew,
    seed: Optional[int] = Seed, device: str = Device, dtype: str = Dtype, max_context: int = MaxContext,
    quantize: Optional[str] = Quantize, no_verify: bool = NoVerify,
    gpu_memory: Optional[str] = GpuMemory, offload_per_layer: Optional[int] = OffloadPerLayer,
    policy: str = Policy, prefetch: int = Prefetch, no_pin: bool = NoPin,
    hybrid: str = Hybrid, cpu_threads: Optional[int] = CpuThreads, cpu_layers: str = CpuLayers,
    device_lookup: str = DeviceLookup, serve_cpu_layers: str = ServeCpuLayers,
    int8_activations: bool = Int8Activations,
    stats: bool = typer.Option(False, "--stats", help="After each answer, print speed and expert-cache statistics."),
):
    """Interactive multi-turn chat. /reset starts over, /exit quits; Ctrl-C stops the current answer."""
    params = _params(temperature, top_p, top_k, max_new_tokens, seed, None)
    engine = _load(_model(model), device, dtype, max_context, quantize, not no_verify,
                   _offload(gpu_memory, offload_per_layer, policy, prefetch, no_pin, hybrid, cpu_threads, cpu_layers,
                            device_lookup, serve_cpu_layers), int8_activations)
    conversation = engine.new_chat(system=system)
    err.print(f"[bold]moe-offload chat[/] {model or 'demo model'} on {engine.device}. /reset starts over, /exit quits, "
              "Ctrl-C stops an answer.", highlight=False, soft_wrap=True)
    while True:
        try:
            user = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return
        command = user.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            conversation.reset()
            err.print("[dim](conversation cleared)[/]")
            continue
        try:
            generation = conversation.send(user, params)
        except MoeOffloadError as e:  # e.g. the conversation outgrew the context: say so and go on
            err.print(f"[bold red]error:[/] {e}", highlight=False)
            continue
        try:
            for event in generation:
                sys.stdout.write(event.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        if stats and generation.completion is not None:
            c, s = generation.completion, _cache_summary(engine)
            err.print(f"[dim]{c.completion_tokens} tokens, prefill {c.prefill_tok_s:.1f} tok/s, decode "
                      f"{c.decode_tok_s:.1f} tok/s | expert cache: hit rate {s['hit_rate']:.2f}, prefetch recall "
                      f"{s['prefetch_recall']:.2f}, {s['bytes_copied_per_token'] / 2**20:.1f} MiB copied/token"
                      + (f", {s['cpu_experts_per_token']:.1f} experts/token on the CPU ({s['cpu_ms_per_token']:.1f} ms)"
                         if engine.hybrid is not None else "") + "[/]", soft_wrap=True, highlight=False)


@app.command("quantize")
@user_errors
def quantize_command(
    src: str = typer.Argument(..., help="Checkpoint to quantize: a model directory or Hub repo id."),
    out: Path = typer.Argument(..., help="Directory to write (must not exist, unless --overwrite)."),
    preset: str = typer.Option("4/3", help="4/2 (experts 2-bit g16, 8-bit scales), 4/2-lean (4-bit scales), "
                                           "4/3 (recommended), 4/4, 8/8."),
    attn_bits: Optional[int] = typer.Option(None, "--attn-bits", help="Override: attention bits."),
    attn_group: Optional[int] = typer.Option(None, "--attn-group", help="Override: attention group size."),
    expert_bits: Optional[int] = typer.Option(None, "--expert-bits", help="Override: expert bits."),
    expert_group: Optional[int] = typer.Option(None, "--expert-group", help="Override: expert group size."),
    expert_meta_bits: Optional[int] = typer.Option(None, "--expert-meta-bits",
                                                   help="Override: quantize expert scales/zeros to 8 or 4 bits."),
    lm_head_bits: Optional[int] = typer.Option(None, "--lm-head-bits", help="Quantize lm_head too (8 or 4)."),
    device: str = typer.Option("auto", help="Where to run the quantizer: auto (GPU if present), cpu, cuda."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
):
    """Quantize a checkpoint with HQQ, layer by layer, into moe-offload's self-describing format."""
    from .checkpoint import write_checkpoint
    from .config import ModelConfig
    from .engine import open_layers, resolve_device
    from .loading import resolve_model_dir
    from .quant.presets import make_preset

    chosen = make_preset(preset, attn_bits=attn_bits, attn_group=attn_group, expert_bits=expert_bits,
                         expert_group=expert_group, expert_meta_bits=expert_meta_bits, lm_head_bits=lm_head_bits)
    directory = resolve_model_dir(src)
    config = ModelConfig.from_file(directory / "config.json")
    if out.exists() and not overwrite:
        raise MoeOffloadError(f"{out}: already exists; choose another output path or pass --overwrite")
    with _ProgressBar() as progress:
        layers, _ = open_layers(directory, config, chosen, progress=progress, quantize_device=resolve_device(device))
        write_checkpoint(out, layers, directory, config, chosen, overwrite=overwrite)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    err.print(f"wrote {out} ({size / 2**20:.1f} MiB, preset {chosen.name}: attention {chosen.attention.bits}-bit "
              f"g{chosen.attention.group_size}, experts {chosen.experts.bits}-bit g{chosen.experts.group_size}"
              f"{f' with {chosen.experts.meta_bits}-bit scales/zeros' if chosen.experts.quant_meta else ''})",
              highlight=False, soft_wrap=True)


@app.command()
@user_errors
def bench(
    model: Optional[str] = typer.Argument(None, help="Model directory or Hub id (or use --synthetic)."),
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="Random model with real shapes: "
                                            "mixtral-8x7b, mixtral-8x22b, qwen3-30b-a3b, olmoe-1b-7b, "
                                            "qwen1.5-moe-a2.7b, tiny."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Quantization preset (synthetic default 4/2; "
                                         "for MODEL: quantize while loading)."),
    prompt_tokens: int = typer.Option(512, "--prompt-tokens"), new_tokens: int = typer.Option(128, "--new-tokens"),
    gpu_memory: Optional[str] = GpuMemory, offload_per_layer: Optional[int] = OffloadPerLayer,
    policy: str = Policy, prefetch: int = Prefetch, no_pin: bool = NoPin,
    hybrid: str = Hybrid, cpu_threads: Optional[int] = CpuThreads, cpu_layers: str = CpuLayers,
    device_lookup: str = DeviceLookup, serve_cpu_layers: str = ServeCpuLayers,
    int8_activations: bool = Int8Activations,
    seed: int = typer.Option(0, help="Seed of the synthetic weights and the random prompt."),
    ablations: bool = typer.Option(False, "--ablations", help="Also run with prefetch toggled (off by "
                                   "default, so 'prefetch 1'), without cache, and everything resident (when it "
                                   "fits), with the same prompt and seed."),
    runs_wanted: Optional[str] = typer.Option(None, "--runs", help="Comma-separated labels of the runs to make, of "
                                              "those this command would (e.g. 'full,no hybrid'); default: all."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the numbers to this JSON file."),
    device: str = Device, dtype: str = Dtype, max_context: int = MaxContext,
    trace: Optional[Path] = typer.Option(None, "--trace", help="No model: replay this routing trace through the "
                                         "cache policies (hit rates per cache size, prefetch recall)."),
    cache_sizes: Optional[str] = typer.Option(None, "--cache-sizes", help="With --trace: slots per layer, e.g. "
                                              "8,16,32 or 1-8 (default 1..min(8, experts))."),
    routing_trace: Optional[Path] = typer.Option(None, "--routing-trace", help="Route every MoE layer as this "
                                                 "recorded trace says instead of by the routers (real reuse)."),
):
    """Measure prefill and batch-1 decode speed against the host-to-device transfer limit."""
    import dataclasses
    import datetime

    from rich.table import Table

    if trace is not None:
        if model is not None or synthetic is not None or routing_trace is not None:
            raise MoeOffloadError("--trace replays a trace without a model; drop MODEL, --synthetic and "
                                  "--routing-trace")
        return _bench_trace(trace, cache_sizes, json_file)
    if cache_sizes is not None:
        raise MoeOffloadError("--cache-sizes goes with --trace")

    from .bench import SYNTHETIC_ROUTING, measure, measure_h2d, release
    from .engine import load, load_synthetic, resolve_device

    if model is not None and synthetic is not None:
        raise MoeOffloadError("give either MODEL or --synthetic NAME (e.g. --synthetic mixtral-8x7b), not both")
    if model is None and synthetic is None:  # the shipped demo model
        model = _model(None, "pass MODEL or --synthetic NAME (e.g. --synthetic mixtral-8x7b)")
    replay_trace = _routing_trace(routing_trace, model, synthetic) if routing_trace is not None else None
    base = _offload(gpu_memory, offload_per_layer, policy, prefetch, no_pin, hybrid, cpu_threads, cpu_layers,
                    device_lookup, serve_cpu_layers)
    base = dataclasses.replace(base, timing=True)
    int8_of: dict[str, bool] = {}  # run label -> int8 activations (default: the command's choice)
    runs = [("full", base)]
    if ablations:
        runs = [("resident", dataclasses.replace(base, gpu_memory=None, offload_per_layer=None))] + runs + [
            ("no prefetch", dataclasses.replace(base, prefetch=0)) if base.prefetch else
            ("prefetch 1", dataclasses.replace(base, prefetch=1)),
            ("no cache", dataclasses.replace(base, cache=False, force=True)),
        ]
    dev = resolve_device(device)
    if hybrid == "on" or base.cpu_layers or (hybrid == "auto" and ablations and dev.type == "cuda"):  # vs copies only
        copies_only = dataclasses.replace(base, hybrid="off", cpu_layers=0, device_lookup="off")
        runs.insert(runs.index(("full", base)) + 1, ("no hybrid", copies_only))
    if hybrid == "on" and not base.cpu_layers:  # splitting misses within experts against whole experts only
        runs.insert(runs.index(("full", base)) + 1, ("split experts", dataclasses.replace(base, split=True)))
    if base.cpu_layers and dev.type == "cuda":  # CPU layers sharing experts with the copy link, against the CPU alone
        runs.insert(runs.index(("full", base)) + 1, ("CPU layers alone", dataclasses.replace(base, cpu_layer_copies=False)))
        if serve_cpu_layers != "off":  # served without the host, against the host syncing at every CPU layer
            runs.insert(runs.index(("full", base)) + 1,
                        ("host CPU layers", dataclasses.replace(base, serve_cpu_layers="off")))
        if ablations:  # the opt-in variants (placement.OffloadOptions)
            runs.insert(runs.index(("full", base)) + 1, ("staged guess", dataclasses.replace(base, stage_cpu_guess=True)))
            runs.insert(runs.index(("full", base)) + 1,
                        ("CPU layers threaded", dataclasses.replace(base, cpu_layers_inline=False)))
    if hybrid == "on" and not base.cpu_layers and dev.type == "cuda":  # the GPU waits for the CPU, against the host
        runs.insert(runs.index(("full", base)) + 1, ("host waits", dataclasses.replace(base, gpu_waits=False)))
    if base.cpu_layers and (device_lookup == "on" or (ablations and device_lookup == "auto" and dev.type == "cuda")):
        runs.insert(runs.index(("full", base)) + 1, ("host lookup", dataclasses.replace(base, device_lookup="off")))
    if ablations and int8_activations:  # the same run with exact activations beside it
        runs.insert(runs.index(("full", base)) + 1, ("exact activations", base))
        int8_of["exact activations"] = False
    if runs_wanted is not None:
        wanted = [w.strip() for w in runs_wanted.split(",") if w.strip()]
        offered = [label for label, _ in runs]
        unknown = [w for w in wanted if w not in offered]
        if unknown or not wanted:
            raise MoeOffloadError(f"--runs {runs_wanted!r}: {', '.join(map(repr, unknown)) or 'no label'} is not among "
                                  f"this command's runs; choose from {', '.join(offered)}")
        runs = [(label, options) for label, options in runs if label in wanted]
    h2d = measure_h2d(dev, pinned=not no_pin)
    name = f"synthetic:{synthetic}" if synthetic else model
    results, resident_ms = [], None
    for label, options in runs:
        with _ProgressBar() as progress:
            try:
                int8 = int8_of.get(label, int8_activations)
                if synthetic:
                    engine = load_synthetic(synthetic, preset=preset or "4/2", device=dev, dtype=dtype,
                                            max_context=max_context, offload=options, seed=seed,
                                            int8_activations=int8, progress=progress)
                else:
                    engine = load(model, device=dev, dtype=dtype, max_context=max_context, quantize=preset,
                                  offload=options, int8_activations=int8, progress=progress)
            except (MoeOffloadError, torch_oom()) as e:
                if label != "full":  # does not fit (e.g. copies only where CPU layers made room): the ablation
                    err.print(f"[dim]{label} run skipped: {str(e).splitlines()[0]}[/]", soft_wrap=True)
                    continue
                raise
        if label == "full" and engine.plan is not None:
            err.print(f"[dim]{engine.plan}[/]", highlight=False)
        routing, replay = SYNTHETIC_ROUTING if synthetic else "the model's own", None
        if replay_trace is not None:
            from .routing import TraceReplay

            replay = TraceReplay(engine.model, replay_trace).install()
            routing = replay.describe(prompt_tokens + new_tokens)
        err.print(f"[dim]measuring {label}...[/]")
        result = measure(engine, label=label, model=name, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                         seed=seed, h2d_gb_s=h2d, resident_ms_per_token=resident_ms, gpu_memory=gpu_memory or "",
                         routing=routing, replay=replay)
        if label == "resident":
            resident_ms = result.decode_ms_per_token
        results.append(result)
        release(engine)
    if not results:
        raise MoeOffloadError(f"none of the runs {', '.join(label for label, _ in runs)} fits this budget")
    table = Table(title=f"moe-offload bench: {name}, preset {results[0].preset}, {results[0].device}")
    for column in ("run", "decode tok/s", "limit tok/s", "% of limit", "prefill tok/s", "hit rate",
                   "prefetch recall", "MiB copied/tok", "CPU experts/tok", "H2D GB/s", "peak GPU GiB"):
        table.add_column(column, justify="right")
    for r in results:
        label = r.label + (" (int8)" if r.int8_activations else "") + (f" ({r.cpu_layers} CPU layers)" if r.cpu_layers else "")
        table.add_row(label, f"{r.decode_tok_s:.1f}", f"{r.limit_tok_s:.1f}",
                      f"{100 * r.decode_tok_s / r.limit_tok_s:.0f}%", f"{r.prefill_tok_s:.0f}", f"{r.hit_rate:.2f}",
                      f"{r.prefetch_recall:.2f}", f"{r.bytes_copied_per_token / 2**20:.1f}",
                      f"{r.cpu_experts_per_token:.1f}"
                      + (f" + {r.split_experts_per_token:.1f} split" if r.split_experts_per_token else ""),
                      f"{r.h2d_gb_s:.1f}",
                      f"{r.peak_gpu_bytes / 2**30:.2f}")
    _table_console().print(table)
    if replay_trace is not None:
        err.print(f"[dim]Routing: {results[0].routing}[/]", soft_wrap=True, highlight=False)
    elif synthetic:
        err.print("[dim]Routing is synthetic: random routers spread tokens close to uniformly over the experts "
                  "(real Mixtral routing is close to uniform too); the hit rate is reported beside every speed.[/]",
                  soft_wrap=True)
    if json_file is not None:
        full = next((r for r in results if r.label == "full"), results[0]).to_json()
        payload = {**full, "date": datetime.date.today().isoformat(), "command": "moe-offload " + " ".join(sys.argv[1:]),
                   "runs": [r.to_json() for r in results]}
        _write_json_atomic(json_file, payload)


def _routing_trace(path: Path, model: str | None, synthetic: str | None):
    """Read a routing trace for --routing-trace and check it fits the model before anything is built."""
    from .config import ModelConfig
    from .trace import check_matches, read_trace

    trace = read_trace(path)
    if synthetic is not None:
        from .synthetic import synthetic_config

        config = synthetic_config(synthetic)
    else:
        from .loading import resolve_model_dir

        config = ModelConfig.from_file(resolve_model_dir(model) / "config.json")
    check_matches(trace, len(config.moe_layers), config.num_experts)
    return trace


def _parse_sizes(text: str) -> list[int]:
    sizes: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            sizes += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise MoeOffloadError(f"--cache-sizes {text!r}: expected numbers and ranges, e.g. 8,16,32 or 1-8") from None
    return sizes


def _bench_trace(path: Path, cache_sizes: str | None, json_file: Path | None) -> None:
    """bench --trace: the cache policies replayed on a recorded trace, decode-style from a cold cache."""
    import datetime

    from rich.table import Table

    from .trace import read_trace
    from .trace_stats import trace_report

    trace = read_trace(path)
    sizes = _parse_sizes(cache_sizes) if cache_sizes else list(range(1, min(8, trace.num_experts) + 1))
    report = trace_report(trace, sizes)
    table = Table(title=f"bench --trace {trace.source}: {trace.num_layers} layers x {trace.num_experts} experts, "
                        f"top-{trace.top_k}", caption=f"hit rate over {report['replayed']}, cold start")
    names = {"lru": "LRU per layer", "global-lru": "global LRU (same total)", "lfu": "LFU per layer",
             "belady": "Belady (optimal per layer)"}
    table.add_column("slots per layer", justify="right")
    for name in report["hit_rate"]:
        table.add_column(names.get(name, name), justify="right")
    for n in report["cache_sizes"]:
        table.add_row(str(n), *(f"{by_size[str(n)]:.3f}" for by_size in report["hit_rate"].values()))
    _table_console().print(table)
    recall = report["prefetch_recall"]
    if recall:
        err.print("prefetch recall (router of layer l + d on layer l's input, top-k): "
                  + ", ".join(f"{d} layer{'s' if d != '1' else ''} ahead {r:.3f}" for d, r in recall.items()),
                  highlight=False, soft_wrap=True)
    else:
        err.print("[dim]prefetch recall: the trace records no look-ahead guesses (moe-offload trace records them)[/]",
                  soft_wrap=True)
    if json_file is not None:
        _write_json_atomic(json_file, {**report, "date": datetime.date.today().isoformat(),
                                       "command": "moe-offload " + " ".join(sys.argv[1:])})


@app.command("trace")
@user_errors
def trace_command(
    model: Optional[str] = DefaultModel,
    text: Path = typer.Option(..., "--text", help="Held-out text to run the model over (UTF-8)."),
    out: Path = typer.Option(..., "--out", help="Trace to write: JSON lines (moe_offload.route_trace v2)."),
    max_tokens: int = typer.Option(4096, "--max-tokens", help="Trace at most this many tokens of the text."),
    context: int = typer.Option(512, "--context", help="Tokens per window; each window starts with an empty "
                                "KV cache."),
    device: str = Device, dtype: str = Dtype, quantize: Optional[str] = Quantize, no_verify: bool = NoVerify,
    gpu_memory: Optional[str] = GpuMemory, offload_per_layer: Optional[int] = OffloadPerLayer,
    no_pin: bool = NoPin,
):
    """Record which experts MODEL routes each token of held-out text to, per MoE layer, with the experts the
    next layers' routers would guess from it (prefetch): teacher-forced, in windows of --context tokens."""
    from .routing import LOOKAHEAD, record_trace
    from .trace import write_trace
    from .trace_stats import prefetch_recall

    if max_tokens < 1:
        raise MoeOffloadError(f"--max-tokens {max_tokens} must be at least 1")
    content = _read_text(text)
    engine = _load(_model(model), device, dtype, max(context, 1) + 1, quantize, not no_verify,
                   _offload(gpu_memory, offload_per_layer, "lru", 0, no_pin, "off"))
    tokens = engine.encode(content)[:max_tokens]
    from .demo import DEMO_NAME

    name = DEMO_NAME if model is None else Path(model).name if Path(model).exists() else model
    with _ProgressBar() as progress:
        trace = record_trace(engine.model, tokens, min(context, engine.max_context - 1), LOOKAHEAD,
                             source=f"{name} on {text.name}", progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_trace(trace, out)
    recall = ", ".join(f"{d} ahead {prefetch_recall(trace, d):.3f}" for d in range(1, trace.lookahead + 1)
                       if d < trace.num_layers)
    err.print(f"wrote {out}: {len(trace)} tokens x {trace.num_layers} MoE layers, top-{trace.top_k} of "
              f"{trace.num_experts}" + (f"; prefetch recall {recall}" if recall else ""), highlight=False,
              soft_wrap=True)


@app.command()
@user_errors
def serve(
    model: Optional[str] = DefaultModel,
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MOE_OFFLOAD_API_KEY",
                                          help="Require this bearer token on /v1/ routes."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests waiting beyond this get HTTP 429."),
    device: str = Device, dtype: str = Dtype, max_context: int = MaxContext,
    quantize: Optional[str] = Quantize, no_verify: bool = NoVerify,
    gpu_memory: Optional[str] = GpuMemory, offload_per_layer: Optional[int] = OffloadPerLayer,
    policy: str = Policy, prefetch: int = Prefetch, no_pin: bool = NoPin,
    hybrid: str = Hybrid, cpu_threads: Optional[int] = CpuThreads, cpu_layers: str = CpuLayers,
    device_lookup: str = DeviceLookup, serve_cpu_layers: str = ServeCpuLayers,
    int8_activations: bool = Int8Activations,
):
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    import uvicorn

    from .server.app import create_app

    from .demo import DEMO_NAME

    engine = _load(_model(model), device, dtype, max_context, quantize, not no_verify,
                   _offload(gpu_memory, offload_per_layer, policy, prefetch, no_pin, hybrid, cpu_threads, cpu_layers,
                            device_lookup, serve_cpu_layers), int8_activations)
    name = DEMO_NAME if model is None else Path(model).name if Path(model).exists() else model
    err.print(f"serving {name} on http://{host}:{port}/v1 ({'API key required' if api_key else 'no API key'})",
              highlight=False, soft_wrap=True)
    uvicorn.run(create_app(engine, name, api_key=api_key, max_queue=max_queue), host=host, port=port,
                log_level="warning")


@app.command("perplexity")
@user_errors
def perplexity_command(
    model: Optional[str] = DefaultModel,
    text: Path = typer.Option(..., "--text", help="Held-out text (UTF-8), e.g. WikiText-2's test split."),
    context: int = typer.Option(512, "--context", help="Tokens per window."),
    stride: Optional[int] = typer.Option(None, "--stride", help="Tokens from one window to the next (default: half of "
                                         "--context). Each token is scored once, with at least context - stride "
                                         "tokens before it (fewer at the start)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Score only the first N tokens of the text."),
    json_file: Optional[Path] = typer.Option(None, "--json", help="Write the result to this JSON file."),
    device: str = Device, dtype: str = Dtype, quantize: Optional[str] = Quantize, no_verify: bool = NoVerify,
    gpu_memory: Optional[str] = GpuMemory, offload_per_layer: Optional[int] = OffloadPerLayer,
    policy: str = Policy, prefetch: int = Prefetch, no_pin: bool = NoPin,
    int8_activations: bool = Int8Activations,
):
    """Perplexity of MODEL on held-out text, in sliding windows of --context tokens."""
    import datetime

    from .config import ModelConfig
    from .evaluate import check_window, perplexity
    from .loading import resolve_model_dir

    stride = context // 2 if stride is None else stride
    check_window(context, stride)
    if max_tokens is not None and max_tokens < 2:
        raise MoeOffloadError(f"--max-tokens {max_tokens} must be at least 2")
    content = _read_text(text)
    path = _model(model)
    limit = ModelConfig.from_file(resolve_model_dir(path) / "config.json").max_position_embeddings
    if context > limit:  # before loading: a big model takes minutes to load
        raise MoeOffloadError(f"--context {context} is longer than the model's context window ({limit} tokens, "
                              "max_position_embeddings in config.json); lower --context")
    engine = _load(path, device, dtype, context, quantize, not no_verify,
                   _offload(gpu_memory, offload_per_layer, policy, prefetch, no_pin, "off"), int8_activations)
    ids = engine.encode(content)[:max_tokens]
    with _ProgressBar() as progress:
        result = perplexity(engine, ids, context, stride, progress)
    preset = engine.preset.name if engine.preset else None
    dt = str(engine.options.dtype).removeprefix("torch.")
    print(f"perplexity {result.perplexity:.3f} on {text.name}: {result.tokens:,} tokens, {result.windows} windows of "
          f"{context} (stride {stride}), {preset or 'unquantized'}, {dt} on {engine.device}, "
          f"{result.tokens_per_s:,.0f} tok/s")
    if json_file is not None:
        _write_json_atomic(json_file, {
            "model": model or "demo", "text": str(text), "perplexity": result.perplexity, "nll": result.nll,
            "tokens": result.tokens, "windows": result.windows, "context": context, "stride": stride,
            "max_tokens": max_tokens, "preset": preset, "dtype": dt, "device": str(engine.device),
            "seconds": round(result.seconds, 3), "tokens_per_s": round(result.tokens_per_s, 1),
            "date": datetime.date.today().isoformat(), "command": "moe-offload " + " ".join(sys.argv[1:])})


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise MoeOffloadError(f"--text {path}: no such file")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MoeOffloadError(f"--text {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not content.strip():
        raise MoeOffloadError(f"--text {path}: the file is empty")
    return content


def torch_oom():
    import torch

    return torch.OutOfMemoryError


def _write_json_atomic(path: Path, payload: dict) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main() -> None:
    app()


if __name__ == "__main__":
    main()
