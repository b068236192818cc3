"""The loop both trainers run (hammer.train_loop), on a scripted backend: the device is read only at
log, evaluation and checkpoint boundaries; a non-finite step stops the run naming it with nothing
saved after it; skip_data moves the data order past its ranges and the metrics show it; SIGTERM
saves the step it arrives in; the lr is the shared schedule's."""
import os
import signal

import numpy as np
import pytest

from hammer.data.loader import LoaderState
from hammer.metrics import DivergedError, TrainMeter, read_metrics
from hammer.schedule import from_config
from hammer.train_config import TrainConfig
from hammer.train_loop import train_loop

CONFIG = TrainConfig(model="m", data=("d",), output="o", steps=20, batch_size=2, lr=1e-3,
                     warmup_steps=4, log_every=5, checkpoint_every=10, eval_every=0,
                     tensorboard=False)


class Batches:
    """A loader whose batch k is [[k]]: what a step trained on is readable from its rows."""

    def __init__(self):
        self.step = 0

    def __next__(self):
        self.step += 1
        return np.array([[self.step - 1]])

    @property
    def state(self):
        return LoaderState(0, self.step)


class Scripted:
    """A backend whose step k returns loss `losses.get(k, 1.0)`; records what the loop asked."""

    primary, processes, compile_time = True, 1, 0.5

    def __init__(self, losses=None, sigterm_at=None):
        self.losses, self.sigterm_at = losses or {}, sigterm_at
        self.batches, self.lrs, self.reads, self.saves, self.done = [], [], [], [], 0

    def step(self, rows, lr):
        self.done += 1
        self.batches.append(int(rows[0, 0]))
        self.lrs.append(lr)
        if self.done == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return self.done

    def read(self, outputs):
        self.reads.append(list(outputs))
        return [{"loss": self.losses.get(k, 1.0), "grad_norm": 2.0} for k in outputs]

    def save(self, step, loader_state):
        self.saves.append((step, loader_state["step"]))

    def agree(self, flag):
        return flag

    def peak_memory_gb(self):
        return None

    def start_profile(self, directory):
        self.profiled = [self.done + 1]

    def stop_profile(self):
        self.profiled.append(self.done)


def run(tmp_path, backend, start=0, **changes):
    config = CONFIG.replace(**changes)
    batches = Batches()
    batches.step = start
    train_loop(config, backend, batches, start=start, run_dir=tmp_path, validation={},
               meter=TrainMeter(64, 1.0, 1, None), previous=None)
    return read_metrics(tmp_path)


def test_the_device_is_read_once_per_boundary_with_every_step_since_the_last(tmp_path):
    backend = Scripted()
    records = run(tmp_path, backend)
    assert backend.reads == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15], [16, 17, 18, 19, 20]]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert backend.saves == [(10, 10), (20, 20)]
    assert records[0]["compile_time"] == 0.5 and "compile_time" not in records[1]


def test_each_step_gets_the_shared_schedules_lr_and_the_record_the_last_one(tmp_path):
    backend = Scripted()
    records = run(tmp_path, backend)
    assert backend.lrs == [from_config(CONFIG)(k) for k in range(20)] and backend.lrs[0] == 0.0
    assert records[0]["lr"] == backend.lrs[4] and records[0]["loss"] == 1.0


def test_a_non_finite_step_stops_the_run_naming_it_and_nothing_after_it_is_saved(tmp_path):
    backend = Scripted(losses={13: float("nan")})
    with pytest.raises(DivergedError, match="step 13: non-finite loss = nan"):
        run(tmp_path, backend)
    assert backend.saves == [(10, 10)]
    assert [r["step"] for r in read_metrics(tmp_path)] == [5, 10]


def test_skip_data_trains_past_its_ranges_and_the_metrics_count_them(tmp_path):
    backend = Scripted()
    records = run(tmp_path, backend, skip_data=((3, 4), (9, 9)))
    # batch k - 1 is the one step k reads unskipped: steps 3, 4 and 9's batches are never read
    assert backend.batches[:8] == [0, 1, 4, 5, 6, 7, 9, 10]
    assert [r["skipped_batches"] for r in records] == [2, 3, 3, 3]
    assert backend.saves == [(10, 13), (20, 23)]  # the data position is saved, skips included


def test_sigterm_saves_the_step_it_arrives_in_and_returns(tmp_path):
    backend = Scripted(sigterm_at=7)
    records = run(tmp_path, backend)
    assert backend.saves == [(7, 7)] and backend.done == 7
    assert [r["step"] for r in records] == [5, 7]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_the_profiler_traces_its_window_and_stops_when_the_run_stops_inside_it(tmp_path):
    backend = Scripted()
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    run(tmp_path / "a", backend, profile_steps=(3, 5))
    assert backend.profiled == [3, 5]
    backend = Scripted(sigterm_at=2)  # a resume from step 3 inside the window, stopped at step 5
    run(tmp_path / "b", backend, start=3, profile_steps=(2, 8))
    assert backend.profiled == [1, 2]  # its steps 1..2 are the run's steps 4..5
