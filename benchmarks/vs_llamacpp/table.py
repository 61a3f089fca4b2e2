"""One markdown table from a vs_llamacpp run: budget x system -> decode, prefill, GPU memory (nvidia-smi peak),
bytes per expert, and for moe-offload the hit rate and the routing.

    python3 benchmarks/vs_llamacpp/table.py DIR      (DIR: the OUT of run.sh)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BUDGETS = ("resident", "12GiB", "9.6GB", "2.5GB", "4.5GB")  # 4.5GB: moe-offload only (its smallest fit)
OURS_EXPERT_MIB = {"4-2": 63.7, "4-2-lean": 53.2, "4-3": 73.5}  # a resident run records no expert size
# Bytes of one Mixtral-8x7B expert (w1, w2, w3): Q2_K 2.625 and Q3_K 3.4375 bits per weight.
LLAMA_EXPERT_BYTES = {"q2_k": 3 * 14336 * 4096 // 256 * 84, "q3_k": 3 * 14336 * 4096 // 256 * 110}
PAIRS = (("q2_k", "4-2"), ("q2_k", "4-2-lean"), ("q3_k", "4-3"))  # llama.cpp's row printed once per quant
NCMOE = {("q2_k", "resident"): 0, ("q2_k", "12GiB"): 10, ("q2_k", "9.6GB"): 16, ("q2_k", "2.5GB"): 32,
         ("q3_k", "resident"): 0, ("q3_k", "12GiB"): 15, ("q3_k", "9.6GB"): 21, ("q3_k", "2.5GB"): 32}


def peak_gib(path: Path) -> str:
    try:
        values = [int(v) for v in path.read_text().split() if v.strip().isdigit()]
    except OSError:
        return "n/a"
    return f"{max(values) / 1024:.1f}" if values else "n/a"


def llama_row(out: Path, quant: str, budget: str) -> list[str]:
    name = f"llama_{quant}_{budget}"
    try:
        runs = json.loads((out / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ["failed", "failed", peak_gib(out / f"{name}.mem")]
    pp = next((r["avg_ts"] for r in runs if r["n_prompt"] > 0 and r["n_gen"] == 0), None)
    tg = next((r["avg_ts"] for r in runs if r["n_gen"] > 0 and r["n_prompt"] == 0), None)
    return [f"{tg:.1f}" if tg else "n/a", f"{pp:.0f}" if pp else "n/a", peak_gib(out / f"{name}.mem")]


# Our run at a budget: "2.5GB" is run.sh's 2580MiB (llama.cpp's own peak with every expert on the CPU).
OURS_BUDGET = {"2.5GB": "2580MiB"}


def ours_name(preset: str, budget: str) -> str:
    return f"ours_{preset}_{OURS_BUDGET.get(budget, budget)}"


def ours_row(out: Path, preset: str, budget: str) -> tuple[list[str], dict | None]:
    name = ours_name(preset, budget)
    try:
        r = json.loads((out / f"{name}.json").read_text())
    except (OSError, json.JSONDecodeError):
        log = out / f"{name}.log"
        fits = not (log.exists() and "too small" in log.read_text())
        status = "failed" if fits else "does not fit"
        return [status, status, peak_gib(out / f"{name}.mem")], None
    return [f"{r['decode_tok_s']:.1f}", f"{r['prefill_tok_s']:.0f}", peak_gib(out / f"{name}.mem")], r


def main() -> None:
    out = Path(sys.argv[1])
    print("| budget | system | experts | decode tok/s | prefill 512 tok/s | GPU GiB (nvidia-smi peak) "
          "| MiB per expert | hit rate | CPU experts/tok | routing |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for budget in BUDGETS:
        printed = set()
        for quant, preset in PAIRS:
            if (quant, budget) in NCMOE and (quant, budget) not in printed:
                printed.add((quant, budget))
                cells = llama_row(out, quant, budget)
                mib = LLAMA_EXPERT_BYTES[quant] / 2**20
                print(f"| {budget} | llama.cpp (-ncmoe {NCMOE[quant, budget]}) | {quant.upper()} | " + " | ".join(cells)
                      + f" | {mib:.1f} | - | - | static split, no copies |")
            cells, r = ours_row(out, preset, budget)
            if r is None and not (out / f"{ours_name(preset, budget)}.log").exists():
                continue
            extra = ["-", "-", "-", "-"] if r is None else [
                f"{(r['expert_bytes'] / 2**20) or OURS_EXPERT_MIB[preset]:.1f}", f"{r['hit_rate']:.2f}", f"{r.get('cpu_experts_per_token', 0):.1f}",
                "synthetic (near uniform)" if r["routing"].startswith("synthetic") else r["routing"]]
            print(f"| {budget} | moe-offload | {preset.replace('-', '/', 1)} | " + " | ".join(cells + extra) + " |")


if __name__ == "__main__":
    main()
