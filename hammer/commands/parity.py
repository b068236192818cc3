"""`hammer parity SRC [DST]`: do a checkpoint and its conversion give the same model on every backend?"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hammer import parity
from hammer.commands import MODEL_PATH_HELP, examples

EXIT_PARITY_FAILED = 1  # distinct from bad input's 2


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "parity", help="compare a checkpoint and its conversion on JAX, the twin and transformers",
        description=parity.__doc__.split("\n\n")[0] + "\n\nExit status: 0 within the bounds, 1 beyond "
                    "them (parity failed), 2 bad input.", **examples(
            "hammer convert runs/hf runs/jax --to jax && hammer parity runs/hf runs/jax",
            "hammer parity runs/hf runs/jax --bf16 --text \"你好，世界\" --max-new-tokens 32",
            "hammer parity runs/jax --json > parity.json        # one directory: every backend reads it"))
    p.add_argument("src", type=Path, help=f"the original: {MODEL_PATH_HELP}")
    p.add_argument("dst", type=Path, nargs="?", help="its conversion (default: SRC alone)")
    p.add_argument("--dtype", choices=parity.DTYPES, default="float32",
                   help="bfloat16: also run every backend in bfloat16 (float32 always runs)")
    p.add_argument("--bf16", dest="dtype", action="store_const", const="bfloat16", help="same as --dtype bfloat16")
    p.add_argument("--text", help="the batch: this text through SRC's tokenizer (default: random ids)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ids (default 0)")
    p.add_argument("--batch-size", type=int, default=2, help="rows of random ids (default 2)")
    p.add_argument("--seq-len", type=int, default=32, help="random ids per row (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=16,
                   help="greedy tokens after the prompt, the batch's first row (default 16)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hammer.sampling import check_context

    directories = {args.src: "SRC"}
    if args.dst is not None and args.dst.resolve() != args.src.resolve():
        directories[args.dst] = "DST"
    for d in directories:
        if not d.is_dir():
            raise FileNotFoundError(f"model directory {d} not found")
    config = parity.read_config(list(directories))
    tokenizer = None
    if args.text is not None:
        tokenizer = _tokenizer(list(directories))
        tokenizer.check_fits(config.vocab_size, str(args.src))
    batch = parity.make_batch(config, tokenizer=tokenizer, text=args.text, seed=args.seed,
                              batch_size=args.batch_size, seq_len=args.seq_len)
    check_context(len(batch.prompt), args.max_new_tokens, config.max_position_embeddings)
    dtypes = ("float32",) if args.dtype == "float32" else ("float32", "bfloat16")
    result = parity.check_parity(directories, batch, dtypes=dtypes, max_new_tokens=args.max_new_tokens,
                                 eos_id=config.eos_token_id)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.table())
    return 0 if result.ok else EXIT_PARITY_FAILED


def _tokenizer(directories: list[Path]):
    """The first directory's tokenizer.model, SRC's before DST's."""
    from convert import model_dir
    from hammer.tokenizer import MODEL_FILE, Tokenizer

    for d in directories:
        if (model_dir(d) / MODEL_FILE).is_file():
            return Tokenizer.from_pretrained(model_dir(d))
    raise parity.ParityError(f"--text needs a tokenizer and no {MODEL_FILE} is in "
                             f"{' or '.join(map(str, directories))}; leave out --text for random ids")
