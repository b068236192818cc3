"""The torch trainer's checkpoints: one directory per step, each an HF model directory plus the
optimizer state of every rank, written in the background while training goes on.

    RUN_DIR/checkpoints/step_<N>/
        config.json, generation_config.json, model.safetensors   the weights with HF names (float32),
                                  written by rank 0: `hammer convert/eval/generate/parity` and a run's
                                  `init` read them as they are
        optimizer/                AdamW's state by parameter name, in torch.distributed.checkpoint's
                                  format: each rank writes the ZeRO-1 shard it holds (__<rank>_0.distcp)
                                  and reads back whichever parameters it holds then, so a run resumes
                                  on another number of ranks
        trainer.json              step, loader state (seed, step), spike window (spike_skip)

Nothing passes through one rank but the weights (a third of the state): no rank gathers AdamW's
state. A save copies the state to host memory and returns; the files are written by background
threads (`dcp.async_save` on a gloo group of its own, as torchtitan does, so that its collectives
never interleave with the training step's), one save at a time. The directory is written under a
temporary name and renamed by rank 0 once every rank's shard is on disk, so a kill leaves either
the whole checkpoint or none.

Resuming: rank 0 chooses the newest checkpoint it reads (a newer one it cannot read is skipped with
a warning naming it) and every rank loads that one; if any rank cannot, all stop with one error
naming the ranks, instead of training different weights. None readable is an error, never a silent
restart.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from convert.hf import torch_step_dirs
from hammer.config import ModelConfig
from hammer.errors import HammerError
from hammer.fsio import partial_name
from hammer_torch.checkpoint import hf_tensors, to_torch

TRAINER_FILE, OPTIMIZER_DIR = "trainer.json", "optimizer"
# Keyed by parameter name, hyperparameters included ("state.<name>.exp_avg",
# "param_groups.<name>.lr"): each rank's keys are its own, and any partition reads them back.
_BY_NAME = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(HammerError):
    """No checkpoint can be resumed by every rank: resuming would restart the run or split it."""


@dataclass(frozen=True)
class TrainerState:
    step: int  # optimizer steps completed
    loader: dict[str, int]  # LoaderState.to_dict()
    spikes: dict | None = None  # train_step.SpikeWindow.to_dict() of a run with spike_skip


class Checkpointer:
    """Saves and restores a run's model and ZeRO-1 optimizer in `directory` (the learning rate is
    the schedule's at each step: nothing of it is saved).

    Collective: every rank makes it, and calls `restore`, `save`, `wait` and `close` at the same
    points. Use it as a context manager: leaving finishes the save in flight."""

    def __init__(self, directory: Path, model_config: ModelConfig, model: torch.nn.Module,
                 optimizer, *, keep: int, tokenizer: Any = None):
        self.directory, self.model_config = Path(directory), model_config
        self.model, self.optimizer = model, optimizer
        self.keep, self.tokenizer = keep, tokenizer
        self.rank = dist.get_rank()
        self.group = dist.new_group(backend="gloo")
        # Rank 0 writes the weights and completes the directory after the shards: one at a time.
        self.writer = ThreadPoolExecutor(1, "checkpoint") if self.rank == 0 else None
        self.pending: Future | None = None
        self._chosen = None  # rank 0: what `_choose` read of the checkpoint it chose

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
        else:  # the loop failed: finish what was saved before, but start no collective of our own
            self._finish_pending()
            self._release()

    def restore(self) -> TrainerState | None:
        """Loads the newest checkpoint into model and optimizer, on every rank; None
        when the run has none yet."""
        choice = [self._choose() if self.rank == 0 else None]
        dist.broadcast_object_list(choice, src=0, group=self.group)
        kind, detail = choice[0]
        if kind == "none":
            return None
        if kind == "unreadable":
            raise CheckpointError(f"no checkpoint in {self.directory} is readable; refusing to "
                                  f"restart the run from scratch: {detail}")
        path = Path(detail)
        read, self._chosen = self._chosen, None  # rank 0's; not held past the restore
        try:
            read = read or _read(path, self.model_config)
            error = None
        except Exception as e:  # noqa: BLE001 -- reported below, with every other rank's
            error = _describe(e)
        self._agree(error, f"reading {path}, the checkpoint rank 0 chose,")
        state, tensors = read
        self.model.load_state_dict(tensors, strict=True)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer.optim, options=_BY_NAME)
        try:  # collective: a rank that fails to read makes every rank raise
            dcp.load({"optimizer": optimizer}, checkpoint_id=path / OPTIMIZER_DIR,
                     process_group=self.group)
        except (Exception, dcp.CheckpointException) as e:  # DCP raises on every rank, naming the failed ones
            raise CheckpointError(f"reading {path}, the checkpoint rank 0 chose, failed: {_describe(e)}; "
                                  f"every rank stops") from None
        set_optimizer_state_dict(self.model, self.optimizer.optim, optimizer, options=_BY_NAME)
        return state

    def save(self, state: TrainerState) -> None:
        """Starts writing step_<state.step>: returns once the state is copied to host memory
        (after the previous save, if still writing, has finished)."""
        self.wait()
        path = self.directory / f"step_{state.step}"
        tmp = [partial_name(path) if self.rank == 0 else None]
        dist.broadcast_object_list(tmp, src=0, group=self.group)
        tmp = tmp[0]
        optimizer = get_optimizer_state_dict(self.model, self.optimizer.optim, options=_BY_NAME)
        shards = dcp.async_save({"optimizer": optimizer}, checkpoint_id=tmp / OPTIMIZER_DIR,
                                process_group=self.group)
        if self.rank == 0:
            trainer = {"step": state.step, "loader": state.loader, "spikes": state.spikes}
            weights = hf_tensors(self.model, snapshot=True)
            self.pending = self.writer.submit(self._complete, path, tmp, weights, trainer, shards)
        else:
            self.pending = shards

    def wait(self) -> None:
        """Blocks until the save in flight is complete on disk, on every rank; a rank whose
        writing failed makes all raise."""
        self._agree(self._finish_pending(), "writing the last checkpoint")

    def close(self) -> None:
        self.wait()
        self._release()

    def _choose(self) -> tuple[str, str | None]:
        """Rank 0: the newest checkpoint it reads, keeping what it read in `_chosen`."""
        for stale in self.directory.glob(".step_*.partial"):  # a save that a kill cut short
            shutil.rmtree(stale)
        failures = []
        for path in reversed(torch_step_dirs(self.directory)):
            try:
                read = _read(path, self.model_config)
                dcp.FileSystemReader(path / OPTIMIZER_DIR).read_metadata()
                self._chosen = read
                return "chosen", str(path)
            except Exception as e:  # noqa: BLE001 -- anything unreadable: the previous one may be fine
                warnings.warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                              f"trying the previous one", stacklevel=3)
                failures.append(f"{path}: {e}")
        return ("unreadable", "; ".join(failures)) if failures else ("none", None)

    def _complete(self, path: Path, tmp: Path, weights: dict[str, np.ndarray],
                  trainer: dict[str, Any], shards: Future) -> None:
        """Rank 0, in the background: the weights beside the shards, then the directory's name."""
        import convert

        try:
            hf = convert.save_hf(tmp / "hf", self.model_config, weights, tokenizer=self.tokenizer)
            for file in hf.iterdir():  # the step directory itself is the HF directory
                file.rename(tmp / file.name)
            hf.rmdir()
            shards.result()  # every rank's shard and DCP's metadata are written
            (tmp / TRAINER_FILE).write_text(json.dumps(trainer, indent=2))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if path.exists():  # one that `restore` found unreadable and skipped: trained again now
            shutil.rmtree(path)
        os.rename(tmp, path)
        for old in torch_step_dirs(self.directory)[:-self.keep]:
            shutil.rmtree(old)

    def _finish_pending(self) -> str | None:
        pending, self.pending = self.pending, None
        try:
            if pending is not None:
                pending.result()
        except (Exception, dcp.CheckpointException) as e:  # reported to every rank by the caller
            return _describe(e)
        return None

    def _agree(self, error: str | None, what: str) -> None:
        """Raises the same CheckpointError on every rank when any rank reports an error."""
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error, group=self.group)
        failed = "; ".join(f"rank {rank} ({e})" for rank, e in enumerate(errors) if e)
        if failed:
            raise CheckpointError(f"{what} failed: {failed}; every rank stops")

    def _release(self) -> None:
        if self.writer is not None:
            self.writer.shutdown()
        dist.destroy_process_group(self.group)


def _describe(error: BaseException) -> str:
    """One line: DCP's CheckpointException carries each failed rank's exception and traceback."""
    if isinstance(error, dcp.CheckpointException):
        return "; ".join(f"rank {rank} ({_describe(e)})" for rank, (e, _) in sorted(error.failures.items()))
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _read(path: Path, model_config: ModelConfig):
    """(TrainerState, the model's tensors) of a checkpoint directory."""
    import convert

    config, tensors = convert.read_checkpoint(path)
    if config != model_config:
        raise ValueError("its config.json describes another model than the run's")
    meta = json.loads((path / TRAINER_FILE).read_text())
    state = TrainerState(int(meta["step"]), dict(meta["loader"]), meta.get("spikes"))
    return state, {name: to_torch(x) for name, x in tensors.items()}
