"""Run the int8 GEMV on Mixtral's expert shapes many times, for Nsight Compute (a script, not the package).

    PYTHONPATH=. ncu --kernel-name regex:_gemv_int8 --launch-skip 40 --launch-count 2 python3 benchmarks/profile_int8.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from kernels import FFN, HIDDEN, rand_qt  # noqa: E402

from moe_offload.kernels import quant_kernels as Q  # noqa: E402

bits, group, qmeta = (int(a) for a in (sys.argv[1:] or ["2", "16", "1"]))
experts = [(rand_qt(FFN, HIDDEN, bits, group, bool(qmeta), 3 * i), rand_qt(FFN, HIDDEN, bits, group, bool(qmeta), 3 * i + 1),
            rand_qt(HIDDEN, FFN, bits, group, bool(qmeta), 3 * i + 2)) for i in range(16)]
x = torch.randn(1, HIDDEN, device="cuda").bfloat16()
h = torch.empty(1, FFN, device="cuda", dtype=torch.bfloat16)
y = torch.empty(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
for _ in range(4):
    for e in experts:
        Q.expert_forward(x, *e, out=y, hidden=h, int8_activations=True)
torch.cuda.synchronize()
print("done")
