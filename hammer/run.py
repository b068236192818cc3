"""A training run's directory, the same for both trainers, and the check that rerunning the same
command resumes the same run.

    RUN_DIR/run.json        the resolved TrainConfig, the model's config.json and the data's
                            fingerprint, written when the run starts (and when `steps` is raised)
    RUN_DIR/metrics.jsonl   one JSON record per logged step and per evaluation (hammer.metrics)
    RUN_DIR/tensorboard/    the same records as TensorBoard events
    RUN_DIR/checkpoints/    the backend's checkpoints; the newest readable one is resumed

A rerun may change how steps are computed (mesh, remat, kernels, logging, checkpoint cadence) and
raise `steps`; anything that changes what the run computes is refused, naming the keys.

Also what both trainers do before and around a run: check their inputs against the model and each
other (`check_inputs`, `check_init`) and turn SIGTERM into a flag the loop reads (`sigterm_flag`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import signal
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from hammer.config import ConfigError, ModelConfig
from hammer.data.prepare import INDEX_FILE
from hammer.fsio import atomic_file
from hammer.train_config import TrainConfig

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
# Keys whose change would make the resumed run another run (the model and data are compared whole).
FROZEN_KEYS = ("backend", "batch_size", "grad_accum", "seed", "lr", "warmup_steps", "min_lr_ratio",
               "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm", "dtype",
               # Beyond the recipe: what is computed, and (spike_skip) the optimizer state's layout.
               # decay_steps moves with steps: hammer.schedule.history_agrees says when they may.
               "schedule", "decay_shape", "z_loss", "document_mask", "spike_skip", "spike_sigmas",
               "spike_window")


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


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


def open_run(config: TrainConfig, model: ModelConfig, data: dict[str, Any], *, write: bool = True) -> Path:
    """The run directory, created for a new run or checked against the run it already holds
    (`write=False`: checked only, as every process of a multi-host run does before process 0 writes).

    Call it after every input has been checked: a bad config must leave no directory behind."""
    run = Path(config.output)
    record = {"config": config.to_dict(), "model": model.to_hf(), "data": data}
    file = run / RUN_FILE
    if file.is_file():
        old = json.loads(file.read_text())
        # A key the run's record lacks was made before the key existed: it had the default.
        before = {k: old["config"].get(k, _DEFAULTS.get(k)) for k in FROZEN_KEYS}
        differ = [k for k in FROZEN_KEYS if before[k] != record["config"][k]]
        differ += [k for k in ("model", "data") if old.get(k) != record[k]]
        if differ:
            detail = "; ".join(f"{k}: {before[k]!r} -> {record['config'][k]!r}"
                               for k in differ if k in FROZEN_KEYS)
            raise ConfigError(
                f"{run} holds a run with another {', '.join(differ)}" + (f" ({detail})" if detail else "")
                + "; rerun with the run's own settings, or choose a new output directory")
    elif run.exists() and any(run.iterdir()):
        raise ConfigError(f"output {run} exists and is not a hammer run directory (no {RUN_FILE}); "
                          f"choose a new output directory")
    if write:
        with atomic_file(file) as f:
            f.write(json.dumps(record, indent=2) + "\n")
    return run


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
    if not config.tokenizer:
        return None
    from hammer.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(config.tokenizer)
    if tokenizer.fingerprint != fingerprint:
        raise ConfigError(f"tokenizer {config.tokenizer} is not the one the data was prepared with "
                          f"({tokenizer.fingerprint} vs {fingerprint})")
    return tokenizer


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
