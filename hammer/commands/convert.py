"""`hammer convert SRC DST --to FORMAT`: SRC's format (HF or hammer JAX) is detected.

Every target is one writer taking HF-named tensors, so a new format is one entry in TARGETS. The
tensors are lazy (`convert.open_checkpoint`): each writer reads, transforms and writes them one at
a time, so a conversion holds at most one copy of the weights.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from convert import ConvertError, check_hf, hf_to_jax, model_dir, open_checkpoint, save_gguf, save_hf, save_jax
from convert.gguf_file import DTYPES as GGUF_DTYPES
from convert.hf import DTYPES, TokenizerFiles, cast, read_generation_config
from hammer.commands import MODEL_PATH_HELP, examples


def write_jax(dst, config, tensors, *, dtype=None, **options):
    # Cast while each tensor is made, not after the whole tree exists in the source dtype.
    save_jax(dst, config, hf_to_jax(cast(tensors, dtype), config), dtype=dtype, **options)


# name -> writer(dst, config, checked HF-named tensors, *, tokenizer, dtype, generation_config).
# The twin's state dict is HF's, names and shapes (tests/test_torch_checkpoint.py holds them to
# convert's table), so its checkpoint is an HF directory, written without importing torch.
TARGETS = {"hf": save_hf, "jax": write_jax, "torch": save_hf, "gguf": save_gguf}


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert checkpoints between HF, JAX and torch, or to GGUF",
                              description=__doc__.splitlines()[0], **examples(
                                  "hammer convert path/to/hf-llama runs/jax --to jax",
                                  "hammer convert runs/jax runs/hf --to hf --dtype bfloat16 --tokenizer path/to/tokenizer",
                                  "hammer convert runs/jax runs/torch --to torch",
                                  "hammer convert runs/1.4b runs/1.4b-q8_0.gguf --to gguf --dtype q8_0"))
    p.add_argument("src", type=Path, help=MODEL_PATH_HELP)
    p.add_argument("dst", type=Path, help="output directory, or file for --to gguf (must not exist)")
    p.add_argument("--to", required=True, choices=sorted(TARGETS), help="output format")
    p.add_argument("--dtype", choices=sorted(set(DTYPES) | set(GGUF_DTYPES)),
                   help="cast weights (default: keep); q8_0 (llama.cpp's 8-bit blocks) for --to gguf only")
    p.add_argument("--tokenizer", type=Path,
                   help="tokenizer directory to include (default: SRC's own tokenizer, rewritten "
                        "by hammer when it is SentencePiece)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.dst.exists():  # before reading what may be gigabytes
        raise FileExistsError(f"output {args.dst} already exists; choose a new path or remove it")
    if args.dtype is not None and args.dtype not in DTYPES and args.to != "gguf":
        raise ConvertError(f"--dtype {args.dtype} is a GGUF quantization; with --to {args.to} use one "
                           f"of {', '.join(sorted(DTYPES))}")
    config, tensors = open_checkpoint(args.src)
    tensors = check_hf(tensors, config)
    # A SentencePiece tokenizer is rewritten by hammer, whose HF files make transformers encode as
    # the model was trained; released Llama-format files alone make transformers 5 encode otherwise.
    source = model_dir(args.src)
    tokenizer_dir = args.tokenizer or (source if (source / "tokenizer.model").is_file() else None)
    if tokenizer_dir is not None:
        from hammer.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = TokenizerFiles(source) or None
    TARGETS[args.to](args.dst, config, tensors, tokenizer=tokenizer, dtype=args.dtype,
                     generation_config=read_generation_config(source))
    print(f"wrote {args.to} checkpoint to {args.dst}")
