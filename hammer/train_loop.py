"""The training loop both trainers run, written once: each backend gives its step, evaluation and
checkpoint (a `Trainer`), and this module does the rest, the same way for both.

    for each step: skip the batches `skip_data` names -> lr from hammer.schedule -> dispatch the step
    at a log, evaluation or checkpoint boundary, or a SIGTERM: read the steps dispatched since the
        last read from the device (one transfer), stop at a non-finite one naming its step (before
        anything after it is saved), log, evaluate, checkpoint

Nothing is read back from the device between boundaries, so a GPU or TPU never waits on the host.
SIGTERM is a local flag; several processes agree on it at each log boundary (a collective), one
process checks it every step. On SIGTERM the loop reads, logs, saves that step and returns (exit 0).
"""
from __future__ import annotations

import contextlib
import itertools
import sys
import time
from pathlib import Path
from typing import Any, ContextManager, Iterable, Iterator, Protocol

import numpy as np
from tqdm import tqdm

from hammer import schedule
from hammer.data.loader import Loader
from hammer.metrics import MetricsLog, TrainMeter, check_finite, perplexity
from hammer.run import PROFILE_DIR, sigterm_flag
from hammer.train_config import TrainConfig


class Trainer(Protocol):
    """A backend's pieces, as the loop uses them."""

    primary: bool  # process 0: writes metrics and the progress bar
    processes: int
    compile_time: float | None  # seconds to compile the step, reported in the first record

    def step(self, rows: np.ndarray, lr: float) -> Any:
        """Dispatches one optimizer update on this process's `rows` of the global batch; returns its
        outputs unread (device values)."""

    def read(self, outputs: list[Any]) -> list[dict[str, float]]:
        """The dispatched steps' outputs as floats ("loss", "grad_norm", ...), in one transfer."""

    def eval_batches(self, dataset) -> Iterator[np.ndarray]:
        """This process's rows of each full `eval_batch_size` batch of `dataset`, in order."""

    def eval_nll(self, batches: Iterable[np.ndarray]) -> tuple[float, int]:
        """(summed next-token NLL over every process's rows, batches) of `batches`."""

    def save(self, step: int, loader_state: dict[str, int]) -> None: ...

    def agree(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (a collective: every process calls it together)."""

    def peak_memory_gb(self) -> float | None: ...

    def task_models(self) -> ContextManager[tuple[Any, Any]]:
        """(scorer, stepper factory) over the live weights, for lm-eval (hammer.tasks)."""

    def start_profile(self, directory: Path) -> None:
        """Starts this process's profiler, its trace to go into `directory`."""

    def stop_profile(self) -> None:
        """Stops the profiler once the traced steps' work is done and writes the trace."""


def train_loop(config: TrainConfig, trainer: Trainer, loader: Loader, *, start: int, run_dir,
               meter: TrainMeter, validation: dict, previous: TrainConfig | None,
               tokenizer=None) -> None:
    """Trains steps start + 1 .. config.steps; `previous`: the config the run last ran with;
    `tokenizer`: the run's, for `eval_tasks`."""
    lr_at = schedule.from_config(config)
    if start:
        if trainer.primary:
            print(f"resuming {run_dir} from step {start}", file=sys.stderr)
            if previous is not None and previous.horizon != config.horizon:
                print(f"schedule_steps {previous.horizon} -> {config.horizon}: lr at step {start + 1} "
                      f"{schedule.from_config(previous)(start):.3e} -> {lr_at(start):.3e}",
                      file=sys.stderr)
    metrics = MetricsLog(run_dir, start, tensorboard=config.tensorboard) if trainer.primary else None
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0, disable=not trainer.primary)
    pending: list[tuple[Any, float]] = []  # (unread outputs, lr) of each step since the last read
    compile_time = trainer.compile_time
    profiling = None  # while the profiler runs: the stack that stops it
    with sigterm_flag() as preempted, contextlib.ExitStack() as closing:
        closing.callback(bar.close)
        if metrics is not None:
            closing.enter_context(metrics)
        began = time.perf_counter()
        for done in range(start + 1, config.steps + 1):
            _skip(loader, config.skip_data)
            lr = lr_at(done - 1)  # update k (0-based) uses lr(k): the first lr(0), as HF's LambdaLR
            first, last = config.profile_steps or (0, 0)
            if trainer.primary and first <= done <= last and profiling is None:  # a resume may
                trainer.start_profile(run_dir / PROFILE_DIR)                   # start inside it
                profiling = closing.enter_context(contextlib.ExitStack())
                profiling.callback(trainer.stop_profile)  # also when the run stops inside the window
            pending.append((trainer.step(next(loader), lr), lr))
            if done == last and profiling is not None:
                profiling.close()
            bar.update()
            log = done % config.log_every == 0 or done == config.steps
            save = done % config.checkpoint_every == 0 or done == config.steps
            evaluate = ((validation or config.eval_tasks) and config.eval_every
                        and done % config.eval_every == 0)
            stop = trainer.agree(preempted()) if log or trainer.processes == 1 else False
            if not (log or save or evaluate or stop):
                continue
            values = trainer.read([out for out, _ in pending])
            for i, (v, (_, lr)) in enumerate(zip(values, pending)):
                if not config.spike_skip:  # with it, a non-finite step was skipped: nothing changed
                    check_finite(done - len(values) + 1 + i, loss=v["loss"], grad_norm=v["grad_norm"])
                v["lr"] = lr
            meter.add(values, time.perf_counter() - began)
            pending = []
            if log or stop:
                record = meter.record(done)
                record["skipped_batches"] = loader.step - done
                if compile_time is not None:  # the first record of this process says it
                    record["compile_time"], compile_time = compile_time, None
                memory = trainer.peak_memory_gb()
                if memory is not None:
                    record["peak_memory_gb"] = memory
                if metrics is not None:
                    metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if evaluate:
                record = evaluate_sets(trainer, validation, config, done)
                if config.eval_tasks:
                    record["tasks"] = task_metrics(trainer, tokenizer, config)
                if metrics is not None:
                    metrics.write(record)
            if save or stop:
                trainer.save(done, loader.state.to_dict())
            if stop:
                if trainer.primary:
                    print(f"SIGTERM: saved step {done} in {run_dir}; rerun the same command to "
                          f"resume", file=sys.stderr)
                break
            began = time.perf_counter()


def evaluate_sets(trainer: Trainer, validation: dict, config: TrainConfig, step: int) -> dict:
    """Per-domain loss and perplexity over the first `eval_batches` full batches of each set (both
    backends score the same tokens: a last partial batch is left out)."""
    domains = {}
    for name, dataset in validation.items():
        batches = itertools.islice(trainer.eval_batches(dataset), config.eval_batches or None)
        total, count = trainer.eval_nll(batches)
        tokens = count * config.eval_batch_size * (dataset.block_size - 1)
        domains[name] = {"loss": total / tokens, "ppl": perplexity(total / tokens), "tokens": tokens}
    return {"step": step, "kind": "eval", "domains": domains}


def task_metrics(trainer: Trainer, tokenizer, config: TrainConfig) -> dict[str, float]:
    """`eval_tasks` on the live weights, `{"TASK/METRIC": value}` (every process takes part)."""
    from hammer.tasks import downstream_metrics

    with trainer.task_models() as (scorer, new_stepper):
        return downstream_metrics(scorer, tokenizer, config.eval_tasks,
                                  limit=config.eval_tasks_limit or None,
                                  include_path=config.eval_tasks_path or None, new_stepper=new_stepper)


def _skip(loader: Loader, ranges) -> None:
    """Moves the loader past the batches `ranges` name (batch k is the one step k reads unskipped)."""
    while any(first <= loader.step + 1 <= last for first, last in ranges):
        loader.step += 1
