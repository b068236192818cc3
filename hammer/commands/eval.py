"""`hammer eval`: perplexity and bits per byte of a model on named domain files, in Skywork's setting
(`hammer.eval`) or lm-eval's (`--mode rolling`, `hammer.rolling`), or lm-eval tasks (`--tasks`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hammer import eval as harness
from hammer.commands import MODEL_PATH_HELP, examples
from hammer.documents import read_documents
from hammer.eval import EvalError

BACKENDS = ("jax", "torch", "hf")
DTYPES = ("float32", "bfloat16")
MODES = ("skywork", "rolling")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="perplexity and bits per byte on domain sets",
                              description=harness.__doc__.split("\n\n")[0], **examples(
                                  "hammer eval --model runs/hf --backend torch --data zh=valid/zh.jsonl en=valid/en.jsonl",
                                  "hammer eval --model runs/jax --data code=valid/code.jsonl --json > eval.json",
                                  "hammer eval --model runs/jax --mode rolling --data en=valid/en.jsonl",
                                  "hammer eval --model runs/1.4b --tasks arc_easy hellaswag --limit 100",
                                  "hammer eval --model runs/jax --tasks my_task --include-path tasks/ --backend torch"))
    p.add_argument("--model", required=True, type=Path, help=MODEL_PATH_HELP)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", nargs="+", action="extend", metavar="NAME=FILE",
                      help="a domain: its name and a .jsonl (field 'text') or .txt (a document a line) file")
    what.add_argument("--tasks", nargs="+", action="extend", metavar="TASK",
                      help="lm-eval tasks to run instead (needs the lmeval extra)")
    p.add_argument("--mode", choices=MODES, default="skywork",
                   help="skywork: documents cut to max_tokens // 3 characters, tokens 2..n scored, no BOS "
                        "(HammerLLM's setting, the default); rolling: lm-eval's loglikelihood_rolling "
                        "(BOS, every token, windows of the model's context, bytes and words of the whole text)")
    p.add_argument("--include-path", type=Path, help="a directory of lm-eval task YAMLs (with --tasks)")
    p.add_argument("--limit", type=int, help="at most this many documents per task (with --tasks)")
    p.add_argument("--backend", choices=BACKENDS, default="jax",
                   help="jax: hammer_jax; torch: the hammer_torch twin; hf: transformers, --mode skywork "
                        "only (default jax)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--tokenizer", type=Path, help="tokenizer directory (default: the model's)")
    p.add_argument("--max-tokens", type=int,
                   help="--mode skywork: documents are cut to max_tokens // 3 characters and max_tokens ids "
                        f"(default {harness.DEFAULT_MAX_TOKENS})")
    p.add_argument("--reference-tokenizer", type=Path,
                   help="--mode skywork: also report loss and ppl per token of this tokenizer "
                        "(Skywork's normalization)")
    p.add_argument("--batch-size", type=int, default=harness.DEFAULT_BATCH_SIZE)
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(func=run)


def parse_domains(specs: list[str]) -> dict[str, Path]:
    domains: dict[str, Path] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise EvalError(f"--data {spec!r}: expected NAME=FILE")
        if name in domains:
            raise EvalError(f"--data: domain {name!r} given twice")
        domains[name] = Path(file)
    return domains


def load_scorer(backend: str, path: Path, dtype: str) -> harness.Scorer:
    """The backend's scorer for the model at `path`; jax and torch are imported only here."""
    if backend == "jax":
        import jax.numpy as jnp

        import hammer_jax
        from hammer_jax.scorer import JaxScorer

        return JaxScorer(hammer_jax.from_pretrained(path, dtype=getattr(jnp, dtype)))
    import torch

    from hammer_torch.scorer import TorchScorer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "hf":
        from convert import is_hf_dir, model_dir

        if not is_hf_dir(model_dir(path)):
            raise EvalError(f"--backend hf reads HF model directories and {path} has no HF weights; "
                             "use --backend jax or torch for a hammer JAX checkpoint")
        return TorchScorer.from_hf(model_dir(path), dtype=getattr(torch, dtype), device=device)
    import hammer_torch

    return TorchScorer.from_twin(hammer_torch.from_pretrained(path, dtype=getattr(torch, dtype)).to(device))


def check_options(args: argparse.Namespace) -> None:
    """Refuses options that the chosen kind of evaluation would not read."""
    lm_eval_run = args.tasks is not None or args.mode == "rolling"
    if lm_eval_run and args.backend == "hf":
        raise EvalError("--backend hf runs --mode skywork only; for lm-eval's numbers on an HF "
                        "directory use --backend jax or torch (or lm_eval --model hf)")
    skywork_only = [f for f, v in (("--max-tokens", args.max_tokens),
                                   ("--reference-tokenizer", args.reference_tokenizer)) if v is not None]
    if skywork_only and (args.tasks is not None or args.mode != "skywork"):
        raise EvalError(f"{skywork_only[0]} applies to --mode skywork only")
    task_only = [f for f, v in (("--include-path", args.include_path), ("--limit", args.limit)) if v is not None]
    if task_only and args.tasks is None:
        raise EvalError(f"{task_only[0]} applies to --tasks only")
    if args.tasks is not None and args.mode != "skywork":
        raise EvalError("--mode applies to --data only: a task says what it scores")
    if args.batch_size < 1:
        raise EvalError(f"--batch-size must be >= 1, got {args.batch_size}")


def run(args: argparse.Namespace) -> int:
    from convert import model_dir
    from hammer.config import ModelConfig
    from hammer.tokenizer import Tokenizer

    check_options(args)
    if not args.model.is_dir():
        raise FileNotFoundError(f"model directory {args.model} not found")
    if args.tasks is not None:
        return run_tasks(args)
    domain_files = parse_domains(args.data)
    if args.mode == "rolling":
        return run_rolling(args, domain_files)
    args.max_tokens = harness.DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    if args.max_tokens < 6:
        raise EvalError(f"--max-tokens must be >= 6, got {args.max_tokens}")
    domains = {name: read_documents(file) for name, file in domain_files.items()}
    files = model_dir(args.model)  # config.json and the tokenizer (a run's own, for a checkpoint)
    tokenizer_dir = args.tokenizer or files
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    tokenizer.check_fits(ModelConfig.from_hf(files).vocab_size, str(args.model))
    reference = Tokenizer.from_pretrained(args.reference_tokenizer) if args.reference_tokenizer else None
    scorer = load_scorer(args.backend, args.model, args.dtype)
    result = harness.evaluate(scorer, tokenizer, domains, max_tokens=args.max_tokens,
                              batch_size=args.batch_size, reference_tokenizer=reference)
    for d in result.domains:
        if d.truncated_documents:
            print(f"note: {d.truncated_documents} {d.name} documents were cut at "
                  f"{min(args.max_tokens, scorer.max_length)} tokens", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": str(args.model), "backend": args.backend, "dtype": args.dtype,
                          "tokenizer": str(tokenizer_dir),
                          "reference_tokenizer": str(args.reference_tokenizer) if reference else None,
                          "data": {name: str(file) for name, file in domain_files.items()},
                          **result.to_json()}, indent=2))
    else:
        print(result.table())
    return 0


def load_lm(args: argparse.Namespace):
    try:
        from hammer.lmeval import HammerLM
    except ModuleNotFoundError as e:
        if e.name != "lm_eval":
            raise
        raise EvalError("--tasks and --mode rolling run through lm-eval, which is not installed: "
                        "pip install 'hammerllm[lmeval]'") from None
    return HammerLM.from_pretrained(args.model, backend=args.backend, dtype=args.dtype,
                                    tokenizer=args.tokenizer, batch_size=args.batch_size)


def run_rolling(args: argparse.Namespace, domain_files: dict[str, Path]) -> int:
    from convert import model_dir

    domains = {name: read_documents(file) for name, file in domain_files.items()}
    lm = load_lm(args)
    from hammer import rolling

    results = rolling.evaluate_rolling(lm, domains)
    if args.json:
        print(json.dumps({"model": str(args.model), "backend": args.backend, "dtype": args.dtype,
                          "mode": "rolling", "tokenizer": str(args.tokenizer or model_dir(args.model)),
                          "data": {name: str(file) for name, file in domain_files.items()},
                          "domains": {name: d.to_json() for name, d in results.items()}}, indent=2))
    else:
        print(rolling.table(results))
    return 0


def run_tasks(args: argparse.Namespace) -> int:
    lm = load_lm(args)
    from lm_eval.utils import make_table

    from hammer import tasks

    results = tasks.run_tasks(lm, args.tasks, limit=args.limit, include_path=args.include_path)
    if args.json:
        print(json.dumps({"model": str(args.model), "backend": args.backend, "dtype": args.dtype,
                          "tasks": args.tasks, "limit": args.limit, "results": results["results"],
                          "metrics": tasks.flat_metrics(results)}, indent=2, default=str))
    else:
        print(make_table(results))
    return 0
