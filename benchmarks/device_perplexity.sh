#!/usr/bin/env bash
# The demo model's held-out perplexity unquantized and per preset (BENCHMARKS.md, like the paper's Table 1).
# Usage on the GPU machine, from the repo root, with .demo_corpus/ carried (test.txt from
# scripts/prepare_demo_corpus.py, wikitext-2-test.txt copied from ../shared/data/text/):
#   OUT=<dir> bash benchmarks/device_perplexity.sh [MODEL]      # MODEL: default the shipped demo model
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
MODEL=${1:-}
for text in test wikitext-2-test; do
  for preset in none 4/4 4/3 4/2; do
    quantize=()
    [ "$preset" != none ] && quantize=(--quantize "$preset")
    python3 -m moe_offload perplexity $MODEL --text ".demo_corpus/$text.txt" "${quantize[@]}" \
      --json "$OUT/perplexity_demo_${text}_${preset/\//-}.json" 2>&1 | grep -v '^$'
  done
done
python3 - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

rows = {}
for path in sorted(Path(sys.argv[1]).glob("perplexity_demo_*.json")):
    r = json.loads(path.read_text())
    rows.setdefault(r["preset"] or "none", {})[Path(r["text"]).name] = r
print("| preset | demo held-out (test.txt) | WikiText-2 test |")
print("|---|---|---|")
for preset in ("none", "4/4", "4/3", "4/2"):
    by_text = rows.get(preset, {})
    cells = [f"{by_text[t]['perplexity']:.3f}" if t in by_text else "-" for t in ("test.txt", "wikitext-2-test.txt")]
    print(f"| {'unquantized' if preset == 'none' else preset} | " + " | ".join(cells) + " |")
EOF
