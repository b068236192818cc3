"""`hammer plot`: training loss, lr, validation perplexity and tokens/s of runs, as one PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

from hammer.commands import examples

DEFAULT_NAME = "curves.png"


def register(subparsers) -> None:
    p = subparsers.add_parser("plot", help="plot the curves of one or more training runs",
                              description=__doc__.splitlines()[0], **examples(
                                  "hammer plot runs/demo/train-jax",
                                  "hammer plot runs/demo/train-jax runs/demo/train-torch --output curves.png"))
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (overlaid)")
    p.add_argument("--output", type=Path,
                   help=f"PNG to write; must not exist (default: {DEFAULT_NAME} in the first run "
                        f"directory, replaced on each plot)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from hammer.plot import plot_runs

    if args.output is not None and args.output.exists():
        raise FileExistsError(f"output {args.output} already exists; choose a new path or remove it")
    output = plot_runs(args.runs, args.output or args.runs[0] / DEFAULT_NAME)
    print(f"wrote {output}")
