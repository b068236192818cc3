"""The JAX trainer's checkpoints: an orbax CheckpointManager in RUN_DIR/checkpoints/.

One directory per step (`checkpoints/<step>/`) holds three items:
    params/     the float32 master params, the tree `convert.save_jax` writes, so `hammer convert`,
                `hammer eval --model` and `hammer generate --model` read a step (or the run
                directory: its newest step) with the model's config.json from the run directory
    opt_state/  the optax state and the step count
    meta/       JSON: step, loader state, seed, the data and tokenizer fingerprint
Saves are asynchronous (the next steps run while a save writes) and orbax keeps the newest
`keep_checkpoints`. On resume the newest readable step is restored, each array straight into its
shard of the current mesh, which may differ from the one that saved it. An unreadable step is
reported by path, moved to RUN_DIR/checkpoints-unreadable/ (kept, never deleted; a later save may
then reuse its step) and the one before it is tried; when none is readable the run stops with an
error rather than start again from step 0.

On many hosts every process saves and restores its own shards (orbax coordinates them; process 0
writes the metadata), so RUN_DIR must be on a filesystem all hosts share. A step unreadable on any
process is set aside by process 0 and all of them try the previous one together.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from convert.jax_checkpoint import saved_shapes
from convert.mapping import _flatten, layout_hint
from hammer.errors import HammerError
from hammer.run import CHECKPOINTS_DIR
from hammer_jax.distributed import any_process, sync
from hammer_jax.train_step import TrainState

UNREADABLE_DIR = "checkpoints-unreadable"


class CheckpointError(HammerError):
    """A run directory whose checkpoints cannot be resumed."""


class TrainCheckpoints:
    def __init__(self, run_dir: str | Path, keep: int):
        self.run_dir = Path(run_dir).absolute()
        self.directory = self.run_dir / CHECKPOINTS_DIR
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               cleanup_tmp_directories=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @staticmethod
    def steps(run_dir: str | Path) -> list[int]:
        """The steps a run directory holds checkpoints of (orbax's temporary ones aside)."""
        directory = Path(run_dir) / CHECKPOINTS_DIR
        if not directory.is_dir():
            return []
        return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())

    def save(self, state: TrainState, meta: dict[str, Any]) -> None:
        """Starts an asynchronous save of `state` at its step (`meta["step"]`)."""
        self.manager.save(meta["step"], args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, abstract: TrainState) -> tuple[TrainState, dict[str, Any]] | None:
        """(state, meta) of the newest readable checkpoint, each array placed as `abstract`'s
        sharding says; None when there is no checkpoint at all."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            path = self.directory / str(step)
            _check_shapes(path, abstract.params)
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract.params),
                    opt_state=ocp.args.StandardRestore({"step": abstract.step,
                                                        "opt_state": abstract.opt_state}),
                    meta=ocp.args.JsonRestore()))
                error = None
            except Exception as e:  # orbax raises many types for a damaged directory
                error = e
            if any_process(error is not None):  # every process goes on from the same step
                self._set_aside(step, path, error)
                continue
            state = TrainState(step=restored.opt_state["step"], params=restored.params,
                               opt_state=restored.opt_state["opt_state"])
            return state, dict(restored.meta)
        if steps:
            raise CheckpointError(f"no checkpoint in {self.directory} is readable (steps "
                                  f"{sorted(steps)}, moved to {self.run_dir / UNREADABLE_DIR}); "
                                  f"not restarting from step 0: restore one, or use a new output")
        return None

    def _set_aside(self, step: int, path: Path, error: Exception | None) -> None:
        """Moves unreadable step `path` aside (`error`: what this process got; None when another
        process failed to read it)."""
        if jax.process_index() == 0:
            aside = self.run_dir / UNREADABLE_DIR / str(step)
            copies = 1
            while aside.exists():  # the same step set aside before: keep both
                aside, copies = aside.with_name(f"{step}.{copies}"), copies + 1
            reason = ("another process could not read it" if error is None else
                      f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}")
            warnings.warn(f"checkpoint {path} is unreadable ({reason}); moved to {aside}, trying "
                          f"the previous one", stacklevel=3)
            aside.parent.mkdir(exist_ok=True)
            path.rename(aside)
        sync(f"hammer: checkpoint {step} set aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _check_shapes(path: Path, params: Any) -> None:
    """A readable checkpoint whose params differ in shape from the model's was written by another
    model or another hammer, not damaged: refused as it is, not set aside as unreadable. (Another
    layer layout, scan_layers, is refused earlier: it is one of the run's frozen keys.)"""
    saved = saved_shapes(path / "params")
    if saved is None:
        return
    for name, leaf in _flatten(params):
        name = ".".join(map(str, name))
        if name in saved and saved[name] != tuple(leaf.shape):
            raise CheckpointError(f"checkpoint {path} holds {name} of shape {saved[name]} where "
                                  f"this model has {tuple(leaf.shape)}"
                                  f"{layout_hint(saved[name], leaf.shape)}")
