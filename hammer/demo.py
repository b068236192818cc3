"""`hammer demo`: the whole system, end to end, on the embedded demo corpus, on a CPU.

corpus -> tokenizer -> token shards (training set, and one validation set per domain) -> a small
Llama initialized at random and saved as an HF directory -> `hammer train` (JAX) from it, with
live progress -> the trained checkpoint exported to HF and to the torch twin -> perplexity and bits
per byte per domain before and after training, scored by JAX (the training checkpoint), the twin
(its own checkpoint) and transformers (the HF export) -> greedy generation from a zh, an en and a
code prompt on both backends -> `hammer parity` of the trained model against transformers ->
a short torch-trainer run from the same initial weights, its per-step losses beside the JAX run's
-> the loss curves of both runs as a PNG.

Every stage is the `hammer` command a user would type, printed as it runs. A stage whose output
exists is skipped and `hammer train` resumes its run directory, so a rerun picks up where a
stopped one ended.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
from pathlib import Path

from hammer.config import ModelConfig
from hammer.data.demo import DOMAINS
from hammer.errors import HammerError
from hammer.fsio import atomic_file
from hammer.metrics import read_metrics

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPTS = {"zh": "中国人民", "en": "The function of the", "code": "def __init__(self"}
AGREE = 1e-4  # relative difference between backends on a trained model, float32


def run(args: argparse.Namespace) -> None:
    out: Path = args.output
    config = ModelConfig.from_hf(args.config)  # bad input: fail before any work
    if args.steps < 1 or not 1 <= args.torch_steps <= args.steps:
        raise HammerError(f"--steps {args.steps} and --torch-steps {args.torch_steps}: expected "
                          f"1 <= torch steps <= steps")
    out.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer, data, valid = out / "corpus", out / "tokenizer", out / "data", out / "valid"
    model_json, init = out / "model.json", out / "init-hf"
    jax_run, torch_run = out / "train-jax", out / "train-torch"
    hf_dir, torch_dir = out / "model-hf", out / "model-torch"

    _stage(corpus, "data", "demo", "--output", corpus, "--max-mb", args.max_mb)
    train_files = [corpus / "train" / f"{d}.jsonl" for d in DOMAINS]
    valid_files = {d: corpus / "valid" / f"{d}.jsonl" for d in DOMAINS}
    _stage(tokenizer, "tokenizer", "train", "--input", *train_files, "--output", tokenizer,
           "--vocab-size", args.vocab_size)
    block = ["--block-size", config.max_position_embeddings, "--quiet"]
    _stage(data, "data", "prepare", "--tokenizer", tokenizer, "--input", *train_files, "--output", data, *block)
    for d, file in valid_files.items():
        _stage(valid / d, "data", "prepare", "--tokenizer", tokenizer, "--input", file, "--output", valid / d, *block)
    _stage(model_json, lambda: _model_config(config, tokenizer, model_json))
    _stage(init, lambda: _init_model(model_json, tokenizer, init, args.seed))

    train = ["train", "--config", REPO_CONFIGS / "tiny.toml", f"model={model_json}", f"init={init}",
             f"data={data}", f"tokenizer={tokenizer}", *[f"validation.{d}={valid / d}" for d in DOMAINS],
             f"seed={args.seed}", "log_every=1"]
    _hammer(*train, f"output={jax_run}", f"steps={args.steps}")
    _stage(hf_dir, "convert", jax_run, hf_dir, "--to", "hf")
    _stage(torch_dir, "convert", jax_run, torch_dir, "--to", "torch")

    domains = [f"{d}={file}" for d, file in valid_files.items()]
    evals = {"init": _report(out / "eval-init.json", "eval", "--model", init, "--backend", "jax",
                             "--json", "--data", *domains)}
    for backend, model in {"jax": jax_run, "torch": torch_dir, "hf": hf_dir}.items():
        evals[backend] = _report(out / f"eval-{backend}.json", "eval", "--model", model, "--backend",
                                 backend, "--tokenizer", tokenizer, "--json", "--data", *domains)
    texts = {(b, d): _hammer("generate", "--model", model, "--backend", b, "--tokenizer", tokenizer,
                             "--prompt", prompt, "--temperature", 0, "--max-new-tokens", 24, capture=True)
             for b, model in {"jax": jax_run, "torch": torch_dir}.items() for d, prompt in PROMPTS.items()}
    parity = _report(out / "parity.json", "parity", jax_run, hf_dir, "--json", "--text", PROMPTS["en"],
                     check=False)

    # The twin's trainer from the same initial weights and data: its losses follow the JAX run's.
    _hammer(train[0], "--backend", "torch", *train[1:], f"output={torch_run}",
            f"steps={args.torch_steps}", f"eval_every={args.torch_steps}")
    _hammer("plot", jax_run, torch_run)

    summary = _summary(evals, texts, parity, read_metrics(jax_run), read_metrics(torch_run))
    with atomic_file(out / "summary.json") as f:
        f.write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    _print_summary(summary, out)
    if not summary["backends_agree"]:
        raise HammerError(f"the backends disagree beyond {AGREE} relative; see {out / 'summary.json'}")


def _stage(output: Path, *argv) -> None:
    """Runs `hammer ARGV...` (or a callable, for steps with no command) unless `output` exists."""
    if output.exists():
        print(f"[skip] {output} exists")
    elif callable(argv[0]):
        argv[0]()
    else:
        _hammer(*argv)


def _hammer(*argv, capture: bool = False, check: bool = True) -> str:
    """Runs `hammer ARGV...` as typed, printing the command; returns its stdout when `capture`."""
    from hammer.cli import main

    argv = [str(a) for a in argv]
    print(f"\n$ hammer {shlex.join(argv)}", flush=True)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer) if capture else contextlib.nullcontext():
        code = main(argv)
    if not capture or argv[0] == "generate":
        print(buffer.getvalue(), end="")
    if code and (check or code != 1):
        raise HammerError(f"stage `hammer {argv[0]}` failed; fix it and rerun `hammer demo`")
    return buffer.getvalue()


def _report(path: Path, *argv, check: bool = True) -> dict:
    """The JSON a `hammer ... --json` command prints, kept in `path` (reused on a rerun)."""
    if path.exists():
        print(f"[skip] {path} exists")
    else:
        text = _hammer(*argv, capture=True, check=check)
        with atomic_file(path) as f:
            f.write(text)
    return json.loads(path.read_text())


def _model_config(config: ModelConfig, tokenizer_dir: Path, dst: Path) -> None:
    """The demo's model config: `config` sized to the tokenizer's vocabulary and special ids."""
    from hammer.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    config = config.replace(vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                            eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    with atomic_file(dst) as f:
        f.write(json.dumps(config.to_hf("float32"), indent=2) + "\n")


def _init_model(model_json: Path, tokenizer_dir: Path, dst: Path, seed: int) -> None:
    """A random Llama (HF's initialization), saved as the HF directory both trainers start from."""
    from flax import nnx

    from hammer.tokenizer import Tokenizer
    from hammer_jax import Llama, save_pretrained

    config = ModelConfig.from_hf(model_json)
    print(f"\n# init: a random {config.param_count():,}-parameter Llama -> {dst}", flush=True)
    save_pretrained(Llama(config, rngs=nnx.Rngs(seed)), dst, to="hf",
                    tokenizer=Tokenizer.from_pretrained(tokenizer_dir))


def _summary(evals: dict, texts: dict, parity: dict, jax_metrics: list, torch_metrics: list) -> dict:
    loss = {b: {d: r["domains"][d]["loss"] for d in DOMAINS} for b, r in evals.items()}
    bpb = {b: {d: r["domains"][d]["bits_per_byte"] for d in DOMAINS} for b, r in evals.items()}
    worst = max(abs(loss[b][d] - loss["hf"][d]) / loss["hf"][d] for b in ("jax", "torch") for d in DOMAINS)
    jax_losses = {r["step"]: r["loss"] for r in jax_metrics if r["kind"] == "train"}
    steps = [(r["step"], jax_losses.get(r["step"]), r["loss"]) for r in torch_metrics if r["kind"] == "train"]
    trajectory = max(abs(j - t) / j for _, j, t in steps if j is not None)
    return {
        "domain_loss": loss, "bits_per_byte": bpb,
        "ppl": {b: {d: r["domains"][d]["ppl"] for d in DOMAINS} for b, r in evals.items()},
        "ppl_fell_everywhere": all(loss["jax"][d] < loss["init"][d] for d in DOMAINS),
        "max_relative_difference": worst, "backends_agree": worst <= AGREE and parity.get("ok", False),
        "parity_ok": parity.get("ok", False),
        "greedy_identical": all(texts["jax", d] == texts["torch", d] for d in PROMPTS),
        "generated": {f"{b}/{d}": text for (b, d), text in texts.items()},
        "loss_jax_vs_torch": [{"step": s, "jax": j, "torch": t} for s, j, t in steps],
        "trajectory_max_relative_difference": trajectory,
    }


def _print_summary(summary: dict, out: Path) -> None:
    print("\n# perplexity per domain (bits per byte), before -> after training")
    print(" | ".join(["model", *DOMAINS]))
    for backend in summary["ppl"]:
        cells = [f"{summary['ppl'][backend][d]:.1f} ({summary['bits_per_byte'][backend][d]:.3f})" for d in DOMAINS]
        print(" | ".join([backend if backend != "init" else "untrained", *cells]))
    print(f"backends on the trained model: max relative loss difference "
          f"{summary['max_relative_difference']:.2e}; hammer parity vs transformers: "
          f"{'ok' if summary['parity_ok'] else 'FAILED'}; greedy generations identical on both "
          f"backends: {summary['greedy_identical']}")
    print("\n# per-step training loss from the same initial weights: JAX trainer vs torch trainer")
    print("step | jax | torch")
    for row in summary["loss_jax_vs_torch"]:
        print(f"{row['step']} | {row['jax']:.5f} | {row['torch']:.5f}")
    print(f"max relative difference: {summary['trajectory_max_relative_difference']:.2e}")
    print(f"\ncurves: {out / 'train-jax' / 'curves.png'}; summary: {out / 'summary.json'}")
