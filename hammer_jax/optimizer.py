"""HammerLLM's optimizer as optax pieces: global-norm clipping, then AdamW, at the learning rate of
the run's schedule, optionally skipping loss spikes.

The learning rate is `hammer.schedule`'s formula (evaluated in jax.numpy) at the run's step, which
the train step passes to `update` (`step=`), not at a count the optimizer keeps: update k uses
lr(k), as HF Trainer's LambdaLR does, and a skipped step moves the schedule on as it does in the
torch trainer. AdamW is optax's own pieces in `optax.adamw`'s order (Adam's scaling, decoupled
weight decay, the learning rate), with the weight-decay rule of `hammer.weight_decay`.

`skip_spikes` wraps the optimizer with OLMo-core's skip-step: the loss goes in with the gradients
(`loss=`), and a spike (`hammer.spikes`) leaves the inner state as it was and the parameters
unchanged (a zero update). The window of losses and the count of skipped steps are part of the
optimizer state, so a checkpoint holds them and a resumed run skips what the uninterrupted one
skips.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hammer import schedule
from hammer.spikes import is_spike
from hammer.train_config import TrainConfig
from hammer.weight_decay import decays


def learning_rate_schedule(config: TrainConfig) -> Callable:
    """step (traced int) -> the run's learning rate, float32."""
    return schedule.from_config(config, xp=jnp)


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays(".".join(str(getattr(k, "key", k)) for k in path)), params)


def scale_by_scheduled_lr(lr_at: Callable) -> optax.GradientTransformationExtraArgs:
    """Updates times -lr_at(step), `step` given to `update`: the last piece of AdamW."""
    def update(updates, state, params=None, *, step, **_):
        lr = lr_at(step)
        return jax.tree.map(lambda g: jnp.array(-lr, dtype=g.dtype) * g, updates), state

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update)


class SkipSpikesState(NamedTuple):
    inner: Any  # the wrapped optimizer's state
    losses: jax.Array  # float32 [spike_window]: the losses of the last applied steps, a ring
    filled: jax.Array  # int32: steps applied so far (the next is written at filled % window)
    skipped: jax.Array  # int32: steps skipped so far


def skip_spikes(inner: optax.GradientTransformation, sigmas: float, window: int
                ) -> optax.GradientTransformationExtraArgs:
    """`inner`, with a step whose `loss` is a spike leaving the parameters and `inner`'s state
    unchanged."""
    def init(params):
        return SkipSpikesState(inner.init(params), jnp.zeros((window,), jnp.float32),
                               jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, loss, **extra):
        loss = loss.astype(jnp.float32)
        spike = is_spike(loss, state.losses, state.filled, sigmas, jnp)
        updates, inner_state = inner.update(updates, state.inner, params, loss=loss, **extra)
        updates = jax.tree.map(lambda u: jnp.where(spike, jnp.zeros_like(u), u), updates)
        inner_state = jax.tree.map(lambda new, old: jnp.where(spike, old, new), inner_state,
                                   state.inner)
        losses = jnp.where(spike, state.losses, state.losses.at[state.filled % window].set(loss))
        return updates, SkipSpikesState(inner_state, losses, state.filled + (~spike),
                                        state.skipped + spike)

    return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformationExtraArgs:
    """The run's optimizer; its `update` takes `step=` (the run's step) and `loss=` (the step's
    loss, read when spike_skip is on)."""
    adamw = optax.chain(
        optax.scale_by_adam(b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_eps),
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        scale_by_scheduled_lr(learning_rate_schedule(config)))
    tx = adamw if not config.max_grad_norm else optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm), adamw)
    return skip_spikes(tx, config.spike_sigmas, config.spike_window) if config.spike_skip else tx
