"""The `hammer` commands' command-line code, one module a command (`hammer/cli.py` dispatches).

Each module defines `register(subparsers)`, which adds the command's parser (with an example in its
epilog) and sets `func`; the work itself lives in the modules the command names.
"""
from __future__ import annotations

import argparse


def examples(*lines: str) -> dict:
    """`add_parser` keywords that end the command's --help with these example lines, as written."""
    return {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines),
            "formatter_class": argparse.RawDescriptionHelpFormatter}
