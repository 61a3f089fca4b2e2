"""moe-offload: run Mixture-of-Experts language models fast on GPUs that cannot hold them."""

import os

# Hardware work queues that CUDA streams share (default 8). Served CPU layers (offload/served.py) make a stream wait on
# a flag that work on another stream sets; sharing a queue with the waiting stream would hold that work back. Set
# before any CUDA context exists; a value set by the user wins (offload.placement checks it).
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "32")

from .engine import Engine, load  # noqa: E402
from .errors import MoeOffloadError  # noqa: E402
from .generate import Completion, TokenEvent  # noqa: E402
from .sampling import SamplingParams  # noqa: E402

__all__ = ["Engine", "load", "MoeOffloadError", "SamplingParams", "Completion", "TokenEvent"]
__version__ = "0.1.0"
