"""`hammer` command line: one subcommand per module, each imported only when it runs.

Each module named below defines `register(subparsers)`, which adds its parser and sets `func`.
The backends (jax, torch) are imported inside the commands that need them.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "convert": ("convert.cli", "convert checkpoints between HF, JAX and torch formats"),
    "tokenizer": ("hammer.commands.tokenizer", "train, merge and judge SentencePiece tokenizers"),
    "data": ("hammer.commands.data", "prepare token shards and the demo corpus"),
    "eval": ("hammer.commands.eval", "perplexity and bits per byte on domain sets"),
    "generate": ("hammer.commands.generate", "sample text from a model"),
    "demo": ("hammer.commands.demo", "run the whole pipeline on the embedded demo corpus"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hammer", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # Register only the command being run, so a broken or heavy module never slows the others.
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if name == wanted:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    # SentencePiece warns on every load of some released models (Llama-2's NUL piece); the CLI owns
    # its process, so it may quiet the library's log there (a library import must not).
    import sentencepiece

    sentencepiece.set_min_log_level(2)
    try:
        return args.func(args) or 0
    except (ValueError, OSError) as e:  # bad input: one line, no traceback
        print(f"hammer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
