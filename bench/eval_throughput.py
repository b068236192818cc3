"""Scored tokens per second of the eval harness against a plain transformers loop (one document at
a time, full logits), on the same documents and the same random model.

    python bench/eval_throughput.py [--tokenizer DIR] [--docs N] [--batch-size N] [--json OUT]

The model is configs/tiny.json with the tokenizer's vocabulary (HammerLLM's by default, so the head
is as wide as HammerLLM's); documents are the first of each domain of the demo corpus
(`hammer.data.demo`: People's Daily, pydoc topics, standard-library modules), cut as the harness cuts them. Runs on CUDA when torch sees
a GPU, else on CPU. Each method runs once untimed (JAX compiles there), then `--repeats` timed
rounds, interleaved; the best round counts. Tokenization is inside the harness's time and outside
the loop's.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hammer import eval as harness  # noqa: E402
from hammer.config import ModelConfig  # noqa: E402
from hammer.data import demo  # noqa: E402
from hammer.fsio import atomic_file  # noqa: E402
from hammer.tokenizer import Tokenizer  # noqa: E402


def documents(per_domain: int) -> dict[str, list[str]]:
    return {domain: [text for _, text in itertools.islice(read(), per_domain)]
            for domain, read in demo.READERS.items()}


def plain_loop(model, ids: list[list[int]], device) -> tuple[float, int]:
    """What an eval script without the harness does: each document alone, all its logits at once."""
    total, scored = 0.0, 0
    with torch.inference_mode():
        for doc in ids:
            if len(doc) < 2:
                continue
            x = torch.tensor([doc], device=device)
            logits = model(x).logits[0, :-1].float()
            total += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            scored += len(doc) - 1
    return total, scored


def best_times(runs: dict, repeats: int) -> dict:
    """Least wall time of each run over `repeats` interleaved rounds, after one warm-up each
    (compilation, allocator, caches); the minimum is the least disturbed by other processes."""
    results = {name: run() for name, run in runs.items()}
    best = {name: math.inf for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: (results[name], best[name]) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=REPO.parent / "shared" / "hammerllm" / "tokenizer")
    parser.add_argument("--docs", type=int, default=48, help="documents per domain")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=harness.DEFAULT_MAX_TOKENS)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (the best is kept)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.json is not None and args.json.exists():
        parser.error(f"--json {args.json} already exists")

    from transformers import LlamaConfig, LlamaForCausalLM

    import hammer_jax
    import hammer_torch
    from hammer_jax.scorer import JaxScorer
    from hammer_torch.scorer import TorchScorer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = Tokenizer.from_pretrained(args.tokenizer)
    config = ModelConfig.from_hf(REPO / "configs" / "tiny.json").replace(vocab_size=tokenizer.vocab_size)
    domains = documents(args.docs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**config.to_hf()))
        model.save_pretrained(tmp)  # for the scorers, which load it as a user's model
        model = model.to(device).eval()

        limit = min(args.max_tokens, config.max_position_embeddings)
        ids = [doc[:limit] for texts in domains.values() for doc in tokenizer.encode_batch(
            [harness.truncate(t, args.max_tokens) for t in texts], add_special_tokens=False)]
        scorers = {
            "HF scorer": TorchScorer.from_hf(tmp, device=device),
            "torch twin": TorchScorer.from_twin(hammer_torch.from_pretrained(tmp).to(device)),
            "JAX": JaxScorer(hammer_jax.from_pretrained(tmp)),
        }
        runs = {"transformers loop, 1 doc at a time": lambda: plain_loop(model, ids, device)}
        for name, scorer in scorers.items():
            runs[f"harness + {name} (batch {args.batch_size})"] = functools.partial(
                harness.evaluate, scorer, tokenizer, domains, max_tokens=args.max_tokens,
                batch_size=args.batch_size)
        for name, (out, seconds) in best_times(runs, args.repeats).items():
            if isinstance(out, harness.EvalResult):
                out = sum(d.nll for d in out.domains), sum(d.scored_tokens for d in out.domains)
            rows.append(dict(method=name, seconds=seconds, tokens=out[1], nll=out[0]))

    base = rows[0]["tokens"] / rows[0]["seconds"]
    print(f"device {device}, torch threads {torch.get_num_threads()}, model configs/tiny.json with vocab "
          f"{config.vocab_size} ({config.param_count() / 1e6:.1f}M params), "
          f"{sum(len(v) for v in domains.values())} documents, max_tokens {args.max_tokens}")
    print(f"{'method':<42}{'tokens':>8}{'seconds':>9}{'tokens/s':>11}{'speedup':>9}{'NLL rel diff':>14}")
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["speedup"] = r["tokens_per_s"] / base
        r["nll_rel_diff"] = abs(r["nll"] - rows[0]["nll"]) / rows[0]["nll"]
        print(f"{r['method']:<42}{r['tokens']:>8}{r['seconds']:>9.2f}{r['tokens_per_s']:>11.0f}"
              f"{r['speedup']:>8.2f}x{r['nll_rel_diff']:>14.1e}")
    if args.json:
        with atomic_file(args.json) as f:
            json.dump({"device": str(device), "torch_threads": torch.get_num_threads(),
                       "vocab_size": config.vocab_size, "documents": {k: len(v) for k, v in domains.items()},
                       "max_tokens": args.max_tokens, "batch_size": args.batch_size,
                       "repeats": args.repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
