"""`hammer` command line: one subcommand per module of hammer/commands/, each imported only when it runs.

Each module named below defines `register(subparsers)`, which adds its parser (an example in its
epilog) and sets `func`. The backends (jax, torch) are imported inside the commands that need them.

One convention for every command: `--json` prints the result as JSON on stdout and nothing else
there; bad input (a `HammerError`, an `OSError`, a bad argument) is one line `hammer CMD: error: ...`
on stderr and exit 2 (`hammer --debug CMD ...` shows the traceback instead); any other exception is
a bug in hammer and keeps its traceback; Ctrl-C exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from hammer.errors import HammerError

COMMANDS = {
    "convert": ("hammer.commands.convert", "convert checkpoints between HF, JAX and torch, or to GGUF"),
    "tokenizer": ("hammer.commands.tokenizer", "train, merge and judge SentencePiece tokenizers"),
    "data": ("hammer.commands.data", "prepare token shards and the demo corpus"),
    "train": ("hammer.commands.train", "pretrain a model on prepared token shards"),
    "eval": ("hammer.commands.eval", "perplexity and bits per byte on domain sets"),
    "generate": ("hammer.commands.generate", "sample text from a model"),
    "parity": ("hammer.commands.parity", "compare a checkpoint and its conversion on every backend"),
    "plot": ("hammer.commands.plot", "plot the curves of training runs"),
    "demo": ("hammer.commands.demo", "run the whole pipeline on the embedded demo corpus"),
}

EXAMPLES = """examples:
  hammer demo --output runs/demo
  hammer eval --help
  hammer --debug data info runs/data        # a traceback instead of the one-line error"""


class Parser(argparse.ArgumentParser):
    """Argument errors as one line, like every other bad input; subcommand parsers inherit this class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = Parser(prog="hammer", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
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
    # orbax logs a warning through absl each time a training checkpoint's params item is read on
    # its own (its metadata file lives one level up, in the step directory): noise for a reader.
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        return args.func(args) or 0
    except (HammerError, OSError) as e:  # bad input a user can fix: one line, no traceback
        if args.debug:
            raise
        print(f"hammer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
