"""`hammer generate`: continue a prompt with a model, streaming the text as it comes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hammer.commands import MODEL_PATH_HELP, examples
from hammer.sampling import Sampler, TextStream, check_context, generate

BACKENDS = ("jax", "torch")
DTYPES = ("float32", "bfloat16")


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="sample text from a model",
                              description="Continue a prompt with a KV cache, printing text as it comes; "
                                          "stops at EOS or after --max-new-tokens.", **examples(
                                  'hammer generate --model runs/jax --prompt "你好" --temperature 0 --max-new-tokens 64',
                                  'hammer generate --model runs/hf --backend torch --prompt "def fib(n):" --top-p 0.9'))
    p.add_argument("--model", required=True, type=Path, help=MODEL_PATH_HELP)
    p.add_argument("--prompt", required=True, help="the text to continue (BOS is added as the tokenizer says)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the model's)")
    p.set_defaults(func=run)


def load_stepper(backend: str, path: Path, dtype: str, max_len: int):
    """The backend's KV-cache step for the model at `path`; jax and torch are imported only here."""
    if backend == "jax":
        import jax.numpy as jnp

        import hammer_jax
        from hammer_jax.generate import JaxStepper

        return JaxStepper(hammer_jax.from_pretrained(path, dtype=getattr(jnp, dtype)), max_len)
    import torch

    import hammer_torch
    from hammer_torch.generate import TorchStepper

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return TorchStepper(hammer_torch.from_pretrained(path, dtype=getattr(torch, dtype)).to(device), max_len)


def run(args: argparse.Namespace) -> int:
    from convert import model_dir
    from hammer.config import ModelConfig
    from hammer.tokenizer import Tokenizer

    sampler = Sampler(args.temperature, args.top_p, args.seed)
    if not args.model.is_dir():
        raise FileNotFoundError(f"model directory {args.model} not found")
    config = ModelConfig.from_hf(model_dir(args.model))
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or model_dir(args.model))
    tokenizer.check_fits(config.vocab_size, str(args.model))
    prompt_ids = tokenizer.encode(args.prompt)
    check_context(len(prompt_ids), args.max_new_tokens, config.max_position_embeddings)
    stepper = load_stepper(args.backend, args.model, args.dtype, len(prompt_ids) + args.max_new_tokens)

    def step(ids):  # rows past the tokenizer's ids (vocab padding) were never trained and cannot be printed
        return stepper(ids)[: tokenizer.vocab_size]

    stream = TextStream(tokenizer, sys.stdout, prompt_ids)
    stream.flush()  # the prompt as the model reads it
    generate(step, prompt_ids, max_new_tokens=args.max_new_tokens, sampler=sampler,
             eos_id=config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_id,
             on_token=stream.add)
    stream.flush()
    sys.stdout.write("\n")
    return 0
