"""The demo model shipped inside the package (``demo_model/``): what the CLI runs when no MODEL is given.

A small Mixtral trained from scratch by ``scripts/train_demo_model.py``; its model card is ``demo_model/README.md``.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MoeOffloadError

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
DEMO_NAME = "moe-offload-demo"


def demo_model_dir(hint: str = "pass a model directory or Hugging Face Hub repo id") -> Path:
    """The shipped demo model's directory; a one-line error (ending with ``hint``) when this installation lacks it."""
    directory = DEMO_MODEL
    if not (directory / "config.json").is_file():
        raise MoeOffloadError(f"no MODEL given and the demo model is not installed ({directory} has no config.json); "
                              f"{hint}")
    return directory
