"""A training run's directory, the same for both trainers, and the check that rerunning the same
command resumes the same run.

    RUN_DIR/run.json        the resolved TrainConfig, the model's config.json and the data's
                            fingerprint, written when the run starts (and when `steps` is raised)
    RUN_DIR/metrics.jsonl   one JSON record per logged step and per evaluation (hammer.metrics)
    RUN_DIR/tensorboard/    the same records as TensorBoard events
    RUN_DIR/checkpoints/    the backend's checkpoints; the newest readable one is resumed

A rerun may change how steps are computed (mesh, remat, kernels, logging, checkpoint cadence) and
raise `steps`; anything that changes what the run computes is refused, naming the keys.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

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
               "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm", "dtype")


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
        differ = [k for k in FROZEN_KEYS if old["config"].get(k) != record["config"][k]]
        differ += [k for k in ("model", "data") if old.get(k) != record[k]]
        if differ:
            detail = "; ".join(f"{k}: {old['config'].get(k)!r} -> {record['config'][k]!r}"
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
