"""What int8 activations cost in quality: the demo model's decode path, exact against int8 (a script).

    PYTHONPATH=. python benchmarks/int8_quality.py --text .demo_corpus/test.txt --tokens 2048 [--json out.json]

Perplexity tools score windows in one prefill, where the option changes nothing (it rounds only decode-sized
products). So this scores the text token by token through ``session.step`` in windows of --window tokens, for each
preset with and without ``int8_activations``, and reports the perplexity and how often the two greedy choices agree.
Runs anywhere; on a CPU the experts apply the same rounding in PyTorch (``QuantExpert``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math

import torch

from moe_offload.demo import demo_model_dir
from moe_offload.engine import load


def score(engine, ids: list[int], window: int) -> tuple[float, list[int]]:
    """Mean NLL of every token after the first of each window, and the greedy choice at each scored position."""
    nll, count, greedy = 0.0, 0, []
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        session = engine.new_session()
        logits, _ = session.prefill(chunk[:1])
        for nxt in chunk[1:]:
            logp = torch.log_softmax(logits.float(), -1)
            nll -= float(logp[nxt])
            greedy.append(int(logits.argmax()))
            count += 1
            logits = session.step(nxt)
    return nll / count, greedy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--presets", default="4/2,4/3,4/4")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = demo_model_dir("")
    rows = []
    for preset in args.presets.split(","):
        results = {}
        for int8 in (False, True):
            engine = load(model, device=args.device, quantize=preset, int8_activations=int8, max_context=args.window + 2)
            ids = engine.encode(open(args.text, encoding="utf-8").read())[: args.tokens + 1]
            results[int8] = score(engine, ids, args.window)
        (nll_e, g_e), (nll_i, g_i) = results[False], results[True]
        agree = sum(a == b for a, b in zip(g_e, g_i)) / len(g_e)
        row = {"preset": preset, "tokens": len(g_e), "ppl_exact": math.exp(nll_e), "ppl_int8": math.exp(nll_i),
               "greedy_agreement": agree}
        rows.append(row)
        print(f"{preset}: perplexity {row['ppl_exact']:.3f} exact, {row['ppl_int8']:.3f} int8 "
              f"({100 * (row['ppl_int8'] / row['ppl_exact'] - 1):+.2f}%), greedy choices agree {100 * agree:.1f}% "
              f"over {len(g_e)} tokens", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "device": args.device, "text": args.text,
                       "window": args.window, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
