"""A training run's directory, the same for both trainers, and the check that rerunning the same
command resumes the same run.

    RUN_DIR/run.json        the resolved TrainConfig, the model's config.json and the data's
                            fingerprint, written when the run starts (and when `steps` is raised)
    RUN_DIR/metrics.jsonl   one JSON record per logged step and per evaluation (hammer.metrics)
    RUN_DIR/tensorboard/    the same records as TensorBoard events
    RUN_DIR/checkpoints/    the backend's checkpoints; the newest readable one is resumed
    RUN_DIR/profile/        the profiler's traces of `profile_steps`

A rerun may change how steps are computed (mesh, remat, kernels, logging, checkpoint cadence) and
raise `steps` (saying what the schedule does: `schedule_steps`); anything that changes what the run
computes is refused, naming the keys (FROZEN_KEYS and FREE_KEYS say which is which, and why).

Also what both trainers do before and around a run: check their inputs against the model and each
other (`check_inputs`, `check_init`) and turn SIGTERM into a flag the loop reads (`sigterm_flag`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import signal
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from hammer.config import ConfigError, ModelConfig
from hammer.errors import HammerError
from hammer.data.prepare import INDEX_FILE
from hammer.fsio import atomic_file
from hammer.schedule import history_agrees
from hammer.train_config import TrainConfig, from_dict

RUN_FILE = "run.json"
PROFILE_DIR = "profile"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
# What a resume may change, key by key: every TrainConfig key is in exactly one of these (a test
# holds it), so a new key forces the question. The model and the data are compared whole.
FROZEN_KEYS = (
    "backend",  # the checkpoints are one backend's
    "batch_size",  # the data order is cut into batches of this size
    "seed",  # the init and the data order
    "lr", "warmup_steps", "min_lr_ratio",  # the schedule (its horizon: `schedule_steps`, below)
    "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm",  # the update rule
    "dtype",  # the computed numbers
    "scan_layers",  # the checkpoints hold the layers stacked or apart, and the init differs
    "schedule",  # the shape of the lr over the whole run
    "z_loss", "document_mask",  # the objective and what attends to what
    "spike_skip", "spike_sigmas", "spike_window",  # which steps apply, and the optimizer state's layout
)
FREE_KEYS = (
    "model", "data",  # compared whole, as the config.json and the data's fingerprint
    "output",  # the run directory itself
    "steps",  # how long to train; the schedule's horizon may not follow it silently (below)
    "schedule_steps",  # an explicit new horizon is the user's choice; the lr before/after is printed
    "decay_steps", "decay_shape",  # wsd: may change while every step trained keeps its lr (a run
                                   # stopped in its stable phase decays from there)
    "skip_data",  # may gain ranges after the checkpoint, never lose one (the data order so far)
    "init",  # read when a run starts, not on resume
    "tokenizer", "validation",  # what is saved beside checkpoints and what is measured
    "grad_accum", "memory_limit_gb",  # how the same batch is split: the same sums
                                      # (tests/test_jax_train_mesh.py)
    "mesh", "distributed",  # where the run computes
    "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_batch_size",
    "eval_batches", "eval_tasks", "eval_tasks_limit", "eval_tasks_path", "tensorboard",
    "profile_steps",  # what is saved, logged, measured and traced
    "attention_impl", "remat", "loss_chunk", "compile", "peak_flops",
    "compilation_cache",  # how a step is computed: the same loss, other speed and memory
)


def data_fingerprint(mixture) -> dict[str, Any]:
    """What the run reads, independent of where it lies: the tokenizer's fingerprint and each
    dataset's index (which holds every shard's sha256), size and weight, in mixture order."""
    return {
        "tokenizer": mixture.datasets[0].fingerprint,
        "block_size": mixture.block_size,
        "datasets": [{"index_sha256": hashlib.sha256((ds.path / INDEX_FILE).read_bytes()).hexdigest(),
                      "blocks": len(ds), "weight": float(w)}
                     for ds, w in zip(mixture.datasets, mixture.weights)],
    }


def previous_config(run_dir: str | Path) -> TrainConfig | None:
    """The config a run directory was last started with (None for a new run)."""
    file = Path(run_dir) / RUN_FILE
    return from_dict(json.loads(file.read_text())["config"]) if file.is_file() else None


def open_run(config: TrainConfig, model: ModelConfig, data: dict[str, Any], *, write: bool = True,
             trained_steps: int = 0) -> Path:
    """The run directory, created for a new run or checked against the run it already holds
    (`write=False`: checked only, as every process of a multi-host run does before process 0 writes).
    `trained_steps`: the newest checkpoint's step, which `steps` may not fall below.

    Call it after every input has been checked: a bad config must leave no directory behind."""
    run = Path(config.output)
    record = {"config": config.to_dict(), "model": model.to_hf(), "data": data}
    file = run / RUN_FILE
    if file.is_file():
        old = json.loads(file.read_text())
        # read as a config: a key the record lacks was made before the key existed, at its default
        previous = from_dict(old["config"])
        before = previous.to_dict()
        differ = [k for k in FROZEN_KEYS if before[k] != record["config"][k]]
        differ += [k for k in ("model", "data") if old.get(k) != record[k]]
        if differ:
            detail = "; ".join(f"{k}: {before[k]!r} -> {record['config'][k]!r}"
                               for k in differ if k in FROZEN_KEYS)
            raise ConfigError(
                f"{run} holds a run with another {', '.join(differ)}" + (f" ({detail})" if detail else "")
                + "; rerun with the run's own settings, or choose a new output directory")
        _check_resume(run, previous, config, trained_steps)
    elif run.exists() and any(run.iterdir()):
        raise ConfigError(f"output {run} exists and is not a hammer run directory (no {RUN_FILE}); "
                          f"choose a new output directory")
    if write:
        with atomic_file(file) as f:
            f.write(json.dumps(record, indent=2) + "\n")
    return run


def _check_resume(run: Path, old: TrainConfig, new: TrainConfig, trained: int) -> None:
    """The keys a resume may change, changed only as they may be."""
    if new.steps < trained:
        raise ConfigError(f"steps = {new.steps}, but {run} has trained {trained} steps already "
                          f"(its newest checkpoint); raise steps, or choose a new output directory")
    if (new.decay_steps, new.decay_shape) != (old.decay_steps, old.decay_shape) \
            and not history_agrees(old, new, trained):
        raise ConfigError(f"decay_steps/decay_shape {old.decay_steps}/{old.decay_shape} -> "
                          f"{new.decay_steps}/{new.decay_shape} would change the lr of steps "
                          f"{run} has trained already; change them only while every trained step "
                          f"keeps its lr (in the stable phase)")
    if not new.schedule_steps and new.horizon != old.horizon:
        raise ConfigError(
            f"steps {old.steps} -> {new.steps} would move the learning-rate schedule's horizon from "
            f"{old.horizon} to {new.horizon} steps, changing the lr of every step from here on; say "
            f"which you mean: schedule_steps={old.horizon} keeps the schedule (the lr stays at its "
            f"floor after step {old.horizon}), schedule_steps={new.horizon} stretches it")
    lost = [list(r) for r in old.skip_data if r not in new.skip_data]
    if lost:
        raise ConfigError(f"skip_data drops {lost}, which this run skipped; a resume may add ranges, "
                          f"never drop one: keep {[list(r) for r in old.skip_data]}")
    position = data_position(trained, old.skip_data)
    late = [list(r) for r in new.skip_data if r not in old.skip_data and r[0] <= position]
    if late:
        raise ConfigError(f"skip_data {late} reaches batches {run} has already trained on (its "
                          f"newest checkpoint is at batch {position} of the data order); a new "
                          f"range must start after {position}")


def data_position(steps: int, skip_data) -> int:
    """Batches of the data order a run has gone through after `steps` steps that skip the
    [first, last] ranges `skip_data` (batch k is the one step k reads when nothing is skipped)."""
    position = 0
    for first, last in skip_data:
        before = first - 1 - position  # batches trained on before this range
        if steps <= before:
            break
        steps -= before
        position = last
    return position + steps


def check_inputs(config: TrainConfig, model: ModelConfig, mixture, validation: Mapping[str, Any]):
    """Checks what both trainers read against the model and each other, before any run directory
    exists; returns the `tokenizer` of the config (None when unset), the one the data was made with."""
    fingerprint = mixture.datasets[0].fingerprint
    for key, datasets in (("data", mixture.datasets), ("validation", validation.values())):
        for ds in datasets:
            vocab = ds.metadata["settings"]["tokenizer"]["vocab_size"]
            if vocab > model.vocab_size:
                raise ConfigError(f"{key}: {ds.path} holds ids of a {vocab}-token vocabulary; the "
                                  f"model's vocab_size is {model.vocab_size}")
            if ds.block_size > model.max_position_embeddings:
                raise ConfigError(f"{key}: {ds.path} has blocks of {ds.block_size} tokens, more than "
                                  f"the model's max_position_embeddings {model.max_position_embeddings}")
    for name, ds in validation.items():
        if ds.fingerprint != fingerprint:
            raise ConfigError(f"validation.{name}: {ds.path} was made with another tokenizer "
                              f"({ds.fingerprint}) than the training data ({fingerprint})")
        if len(ds) < config.eval_batch_size:
            raise ConfigError(f"validation.{name}: {ds.path} has {len(ds)} blocks, fewer than "
                              f"eval_batch_size {config.eval_batch_size}")
    if config.eval_tasks:
        _check_tasks(config)
    if not config.tokenizer:
        return None
    from hammer.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(config.tokenizer)
    if tokenizer.fingerprint != fingerprint:
        raise ConfigError(f"tokenizer {config.tokenizer} is not the one the data was prepared with "
                          f"({tokenizer.fingerprint} vs {fingerprint})")
    return tokenizer


def _check_tasks(config: TrainConfig) -> None:
    if not config.tokenizer:
        raise ConfigError(f"eval_tasks = {list(config.eval_tasks)} needs tokenizer: lm-eval's "
                          f"requests are text")
    try:
        from hammer.tasks import checked_tasks
    except ImportError:
        raise ConfigError("eval_tasks needs lm-evaluation-harness: pip install 'hammerllm[lmeval]'") from None
    try:
        checked_tasks(config.eval_tasks, config.eval_tasks_path or None)
    except (HammerError, FileNotFoundError) as e:
        raise ConfigError(f"eval_tasks: {e}") from None


def check_init(init: str, theirs: ModelConfig, model: ModelConfig) -> None:
    """Refuses an `init` checkpoint (config `theirs`) of another model than the run's, naming
    every field that differs."""
    differ = [f"{name} {there!r} there, {here!r} here" for name, there, here in theirs.differences(model)]
    if differ:
        raise ConfigError(f"init {init} holds another model than the run's: {', '.join(differ)}")


@contextlib.contextmanager
def sigterm_flag() -> Iterator[Callable[[], bool]]:
    """While inside, SIGTERM (a preemption) only raises a flag, read by calling the yielded
    function: the loop finishes its step, saves a checkpoint and returns normally (exit 0)."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda *_: received.append(True))
    try:
        yield lambda: bool(received)
    finally:
        signal.signal(signal.SIGTERM, previous)
