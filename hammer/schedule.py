"""The learning-rate schedules, each written once as a formula both trainers evaluate.

Step s counts optimizer updates from 0 (the first update uses lr(0)), as the metrics log it. Both
schedules warm up linearly, peak * s / warmup_steps for s < warmup_steps, then:

`cosine_clamped` (HammerLLM's, the default): HF Trainer's cosine with a floor patched in, from the
peak to zero over the remaining steps, clamped from below at `min_lr_ratio` of the peak. It is not
optax's `warmup_cosine_decay_schedule`, which rescales the cosine to end at the floor instead.

    lr(s) = peak * max(r, 0.5 * (1 + cos(pi * (s - warmup) / (steps - warmup))))

`wsd` (warmup-stable-decay): the peak until the last `decay_steps` steps, then a decay to
`min_lr_ratio` of it with p = (s - (steps - decay_steps)) / decay_steps:

    lr(s) = peak * (r + (1 - r) * f(p)),  f(p) = 1 - p | (1 + cos(pi p)) / 2 | 1 - sqrt(p)

A WSD run's stable phase depends on `steps` only through where the decay starts, so a run stopped
at a checkpoint of step S of its stable phase decays from there when resumed with
steps = S + decay_steps: `history_agrees` says that such a change leaves every step taken as it was. Denominators are taken as at least 1 (HF's convention), so a run without
warmup or decay is defined.

Both trainers evaluate it on the host (hammer.train_loop) and hand each step its lr.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

SCHEDULES = ("cosine_clamped", "wsd")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def learning_rate(step, *, peak: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
                  schedule: str = "cosine_clamped", decay_steps: int = 0,
                  decay_shape: str = "linear"):
    """The learning rate of optimizer update `step` (0-based; an array of steps gives theirs)."""
    s = np.asarray(step, dtype=np.float64)
    warm = peak * s / max(1, warmup_steps)
    if schedule == "cosine_clamped":
        # past the horizon (a run trained beyond its schedule) the lr stays at the cosine's end
        progress = np.minimum(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        after = peak * np.maximum(min_lr_ratio, 0.5 * (1.0 + np.cos(np.pi * progress)))
    elif schedule == "wsd":
        p = np.clip((s - (total_steps - decay_steps)) / max(1, decay_steps), 0.0, 1.0)
        after = peak * (min_lr_ratio + (1.0 - min_lr_ratio) * _decay(p, decay_shape))
    else:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    return np.where(s < warmup_steps, warm, after)


def _decay(p, shape: str):
    """f(p): 1 at the start of the decay, 0 at its end."""
    if shape == "linear":
        return 1.0 - p
    if shape == "cosine":
        return 0.5 * (1.0 + np.cos(np.pi * p))
    if shape == "1-sqrt":
        return 1.0 - np.sqrt(p)
    raise ValueError(f"decay_shape {shape!r} is not one of {', '.join(DECAY_SHAPES)}")


def history_agrees(old, new, step: int) -> bool:
    """Whether two `TrainConfig`s gave every update before `step` the same learning rate: what a
    resume from a checkpoint of step `step` with changed schedule keys (say, `steps` for a WSD run
    stopped in its stable phase) needs for the run so far to stay the run it was."""
    steps = np.arange(step)
    return bool(np.array_equal(from_config(old)(steps), from_config(new)(steps)))


def from_config(config) -> Callable:
    """`learning_rate` of a `TrainConfig`'s keys: step -> lr, a Python float (steps -> lrs for an
    array of them)."""
    def schedule(step):
        lr = learning_rate(step, peak=config.lr, warmup_steps=config.warmup_steps,
                           total_steps=config.horizon, min_lr_ratio=config.min_lr_ratio,
                           schedule=config.schedule, decay_steps=config.decay_steps,
                           decay_shape=config.decay_shape)
        return float(lr) if np.ndim(lr) == 0 else lr
    return schedule
