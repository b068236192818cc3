"""The `hammer` commands' command-line code, one module a command (`hammer/cli.py` dispatches).

Each module defines `register(subparsers)`, which adds the command's parser (with an example in its
epilog) and sets `func`; the work itself lives in the modules the command names.
"""
from __future__ import annotations

import argparse

# What every command that reads a model takes (convert.model_dir finds its config and tokenizer).
MODEL_PATH_HELP = ("an HF model directory, a hammer JAX directory, or a training run of either "
                   "backend or any of its checkpoints (a run: its newest)")


def examples(*lines: str) -> dict:
    """`add_parser` keywords that end the command's --help with these example lines, as written."""
    return {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}
