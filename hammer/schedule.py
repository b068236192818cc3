"""HammerLLM's learning-rate schedule, written once as the formula both trainers are tested against.

HF Trainer's cosine with a floor patched in: linear warmup to the peak, then the cosine from the
peak to zero over the remaining steps, clamped from below at `min_lr_ratio` of the peak. It is not
optax's `warmup_cosine_decay_schedule`, which rescales the cosine to end at the floor instead.

    lr(s) = peak * s / warmup                                                   s < warmup
    lr(s) = peak * max(min_lr_ratio, 0.5 * (1 + cos(pi * (s - warmup) / (steps - warmup))))

`steps - warmup` is taken as at least 1, as HF does, so a run with no decay phase is defined.
"""
from __future__ import annotations

import math
from typing import Callable


def learning_rate(step: int, *, peak: float, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based: the first update uses lr(0))."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    # past the horizon (a run trained beyond its schedule) the lr stays at the cosine's end
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * max(min_lr_ratio, 0.5 * (1.0 + math.cos(math.pi * progress)))


def from_config(config) -> Callable[[int], float]:
    """`learning_rate` with a `TrainConfig`'s lr, warmup_steps, horizon and min_lr_ratio bound."""
    def schedule(step: int) -> float:
        return learning_rate(step, peak=config.lr, warmup_steps=config.warmup_steps,
                             total_steps=config.horizon, min_lr_ratio=config.min_lr_ratio)
    return schedule
