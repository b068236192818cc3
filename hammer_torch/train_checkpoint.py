"""The torch trainer's checkpoints: one directory per step, each an HF model directory plus the state
that resumes the run exactly.

    RUN_DIR/checkpoints/step_<N>/
        config.json, generation_config.json, model.safetensors   the weights with HF names (float32):
                                                                 `hammer convert/eval/generate` and a
                                                                 JAX run's `init` read them as they are
        optimizer.pt      AdamW's state consolidated from the ZeRO-1 shards, and the LR scheduler's
        trainer.json      step, loader state (seed, step), spike window (spike_skip), world size
        rng.pt            the torch (and CUDA) RNG state of every rank

A directory is written under a temporary name and renamed when complete (hammer.fsio), so a kill
leaves either the whole checkpoint or none. Resuming takes the newest that reads; a newer one that
does not is skipped with a warning naming it, and none readable is an error, never a silent restart.
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from convert.hf import torch_step_dirs
from hammer.config import ModelConfig
from hammer.errors import HammerError
from hammer.fsio import atomic_directory
from hammer_torch.checkpoint import save_pretrained, to_torch

TRAINER_FILE, OPTIMIZER_FILE, RNG_FILE = "trainer.json", "optimizer.pt", "rng.pt"


class CheckpointError(HammerError):
    """Every checkpoint of a run directory is unreadable: resuming would silently restart the run."""


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps completed
    loader: dict[str, int]  # LoaderState.to_dict()
    spikes: dict | None = None  # train_step.SpikeWindow.to_dict() of a run with spike_skip


def save(directory: Path, state: TrainerState, model: torch.nn.Module, optimizer, scheduler,
         keep: int, tokenizer: Any = None) -> Path | None:
    """Collective: every rank calls it. Rank 0 writes step_<N> and drops all but the newest `keep`."""
    optimizer.consolidate_state_dict(to=0)  # ZeRO-1: each rank sends its shard of AdamW's state
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng)
    path = None
    if dist.get_rank() == 0:
        path = directory / f"step_{state.step}"
        if path.exists():  # one that `restore` found unreadable and skipped: trained again now
            shutil.rmtree(path)
        with atomic_directory(path) as tmp:
            hf = save_pretrained(model, tmp / "hf", tokenizer=tokenizer)
            for file in hf.iterdir():  # the step directory itself is the HF directory
                file.rename(tmp / file.name)
            hf.rmdir()
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                       tmp / OPTIMIZER_FILE)
            torch.save(rngs, tmp / RNG_FILE)
            (tmp / TRAINER_FILE).write_text(json.dumps(
                {"step": state.step, "loader": state.loader, "spikes": state.spikes,
                 "world_size": dist.get_world_size()}, indent=2))
        for old in torch_step_dirs(directory)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return path


def restore(directory: Path, model_config: ModelConfig, model: torch.nn.Module, optimizer,
            scheduler) -> TrainerState | None:
    """Loads the newest readable checkpoint into model, optimizer, scheduler and this rank's RNG;
    None when the run has none yet."""
    candidates = torch_step_dirs(directory)
    if not candidates:
        return None
    failures = []
    for path in reversed(candidates):
        try:
            state, tensors, saved, rngs = _read(path, model_config)
        except Exception as e:  # noqa: BLE001 -- anything unreadable: the previous one may be fine
            warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                          f"trying the previous one", stacklevel=2)
            failures.append(f"{path}: {e}")
            continue
        model.load_state_dict(tensors, strict=True)
        optimizer.load_state_dict(saved["optimizer"])  # ZeRO-1 keeps this rank's partition
        scheduler.load_state_dict(saved["scheduler"])
        rank = dist.get_rank()
        if rank < len(rngs):  # the same world size: each rank continues its own streams
            torch.set_rng_state(rngs[rank]["cpu"])
            if rngs[rank]["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rngs[rank]["cuda"])
        return state
    raise CheckpointError(f"no checkpoint in {directory} is readable; refusing to restart the run "
                          f"from scratch: " + "; ".join(failures))


def _read(path: Path, model_config: ModelConfig):
    import convert

    config, tensors = convert.read_checkpoint(path)
    if config != model_config:
        raise ValueError("its config.json describes another model than the run's")
    meta = json.loads((path / TRAINER_FILE).read_text())
    state = TrainerState(int(meta["step"]), dict(meta["loader"]), meta.get("spikes"))
    # Memory-mapped: each rank copies out only its ZeRO-1 partition, not the whole state.
    saved = torch.load(path / OPTIMIZER_FILE, weights_only=True, mmap=True)
    rngs = torch.load(path / RNG_FILE, weights_only=True)
    return state, {name: to_torch(x) for name, x in tensors.items()}, saved, rngs
