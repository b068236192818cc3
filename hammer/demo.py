"""`hammer demo`: every stage that exists, end to end, on the embedded demo corpus, on CPU.

corpus -> tokenizer -> token shards -> a randomly initialized Flax Llama (configs/tiny.json) ->
HF and torch checkpoints -> one batch scored by both backends -> perplexity on the zh/en/code
validation sets with the JAX model, the torch twin and transformers -> greedy generation on both
backends. Each stage is the `hammer` command a user would type (printed as it runs), writes its
own directory atomically, and is skipped when that directory exists, so a rerun resumes. Until the
trainer lands the model is untrained: its perplexity is near the vocabulary size, and the point is
that three implementations agree on it.
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from hammer.config import ModelConfig
from hammer.data.demo import DOMAINS
from hammer.errors import HammerError
from hammer.fsio import atomic_file

def run(args: argparse.Namespace) -> None:
    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, data = out / "corpus", out / "tokenizer", out / "data"
    jax_dir, hf_dir, torch_dir = out / "model-jax", out / "model-hf", out / "model-torch"
    config = ModelConfig.from_hf(args.config)  # bad config: fail before any work

    _stage(corpus, "data", "demo", "--output", corpus, "--max-mb", args.max_mb)
    _stage(tokenizer, "tokenizer", "train", "--input", *_files(corpus, "train"),
           "--output", tokenizer, "--vocab-size", args.vocab_size)
    _stage(data, "data", "prepare", "--tokenizer", tokenizer, "--input", *_files(corpus, "train"),
           "--output", data, "--block-size", config.max_position_embeddings, "--quiet")
    _stage(jax_dir, lambda: _init_model(config, tokenizer, jax_dir, args.seed))
    _stage(hf_dir, "convert", jax_dir, hf_dir, "--to", "hf")
    _stage(torch_dir, "convert", hf_dir, torch_dir, "--to", "torch")

    losses = _batch_losses(jax_dir, hf_dir, data, args.seed)
    models = {"jax": jax_dir, "torch": hf_dir, "hf": hf_dir}  # backend -> the checkpoint it reads
    evals = {}
    for backend, model in models.items():
        report = out / f"eval-{backend}.json"
        argv = ["eval", "--model", model, "--backend", backend, "--json",
                "--data", *[f"{d}={corpus / 'valid' / f'{d}.jsonl'}" for d in DOMAINS]]
        _stage(report, lambda: _write(report, _hammer(*argv, capture=True)))
        evals[backend] = json.loads(report.read_text())
    texts = {b: _hammer("generate", "--model", models[b], "--backend", b, "--prompt",
                        "The quick brown fox", "--temperature", 0, "--max-new-tokens", 16, capture=True)
             for b in ("jax", "torch")}
    summary = _summary(losses, evals, texts)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    _print_summary(summary)
    if not summary["backends_agree"]:
        raise ValueError("the backends disagree beyond 1e-4 relative; see summary.json")


def _stage(output: Path, *argv) -> None:
    """Runs `hammer ARGV...` (or a callable, for steps with no command yet) unless `output` exists."""
    if output.exists():
        print(f"[skip] {output} exists")
    elif callable(argv[0]):
        argv[0]()
    else:
        _hammer(*argv)


def _hammer(*argv, capture: bool = False) -> str:
    """Runs `hammer ARGV...` as typed, printing the command; returns its stdout when `capture`."""
    import contextlib
    import io

    from hammer.cli import main

    argv = [str(a) for a in argv]
    print(f"\n$ hammer {shlex.join(argv)}", flush=True)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer) if capture else contextlib.nullcontext():
        code = main(argv)
    print(buffer.getvalue(), end="")
    if code:
        raise HammerError(f"stage `hammer {argv[0]}` failed; fix it and rerun `hammer demo`")
    return buffer.getvalue()


def _write(path: Path, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def _files(corpus: Path, split: str) -> list[Path]:
    return [corpus / split / f"{d}.jsonl" for d in DOMAINS]


def _init_model(config: ModelConfig, tokenizer_dir: Path, dst: Path, seed: int) -> None:
    """A random Flax Llama sized to the tokenizer, saved as a hammer JAX checkpoint."""
    from flax import nnx

    from hammer.tokenizer import Tokenizer
    from hammer_jax import Llama, save_pretrained

    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    config = config.replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    print(f"\n# init: random {config.param_count():,}-parameter Llama -> {dst}", flush=True)
    save_pretrained(Llama(config, rngs=nnx.Rngs(seed)), dst, to="jax", tokenizer=tokenizer)


def _batch_losses(jax_dir: Path, hf_dir: Path, data: Path, seed: int) -> dict[str, float]:
    """Next-token loss of one shuffled training batch, computed by each backend from its checkpoint."""
    import numpy as np
    import optax
    import torch

    import hammer_jax
    import hammer_torch
    from hammer.data.loader import Loader, Mixture
    from hammer.data.prepared import load_prepared
    from hammer_torch.loss import causal_lm_loss

    batch = Loader(Mixture([load_prepared(data)]), global_batch_size=2, seed=seed).batch(0)
    logits = hammer_jax.from_pretrained(jax_dir)(batch)
    jax_loss = float(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch[:, 1:]).mean())
    twin = hammer_torch.from_pretrained(hf_dir, attn_impl="eager")
    with torch.no_grad():
        torch_loss = float(causal_lm_loss(twin, torch.from_numpy(batch.astype(np.int64))))
    print(f"\n# one batch {batch.shape}: loss jax {jax_loss:.6f}, torch {torch_loss:.6f}")
    return {"jax": jax_loss, "torch": torch_loss}


def _summary(losses: dict, evals: dict, texts: dict) -> dict:
    domain_loss = {b: {name: d["loss"] for name, d in r["domains"].items()} for b, r in evals.items()}
    ref = domain_loss["hf"]
    worst = max(abs(domain_loss[b][n] - ref[n]) / ref[n] for b in domain_loss for n in ref)
    worst = max(worst, abs(losses["jax"] - losses["torch"]) / losses["torch"])
    return {"batch_loss": losses, "domain_loss": domain_loss,
            "average_ppl": {b: r["average"]["ppl"] for b, r in evals.items()},
            "max_relative_difference": worst, "backends_agree": worst <= 1e-4,
            "greedy_identical": texts["jax"] == texts["torch"], "generated": texts}


def _print_summary(summary: dict) -> None:
    names = list(summary["domain_loss"]["hf"])
    print("\n" + " | ".join(["backend", *[f"{n} loss" for n in names], "avg ppl"]))
    for backend, losses in summary["domain_loss"].items():
        cells = [f"{losses[n]:.5f}" for n in names] + [f"{summary['average_ppl'][backend]:.1f}"]
        print(" | ".join([backend, *cells]))
    print(f"max relative difference between backends: {summary['max_relative_difference']:.2e}; "
          f"greedy generations identical: {summary['greedy_identical']}")
