"""moe-offload: run Mixture-of-Experts language models fast on GPUs that cannot hold them."""

from .engine import Engine, load
from .errors import MoeOffloadError
from .generate import Completion, TokenEvent
from .sampling import SamplingParams

__all__ = ["Engine", "load", "MoeOffloadError", "SamplingParams", "Completion", "TokenEvent"]
__version__ = "0.1.0"
