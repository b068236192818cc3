"""HammerLLM's optimizer as optax pieces: global-norm clipping, then AdamW, optionally skipping
loss spikes.

The learning rate is not in here: the train step takes it as an argument (the loop evaluates
`hammer.schedule`, the one definition both backends use), so one compiled step serves any lr,
schedule or run length. AdamW runs at a constant rate of 1, as a schedule so that its state keeps
the layout of checkpoints written when the schedule lived here, and the step scales its update.
Which parameters decay is `hammer.weight_decay`'s rule.

`skip_spikes` wraps the optimizer with OLMo-core's skip-step: the loss goes in with the gradients
(`loss=`), and a spike (`hammer.spikes`) leaves the inner state as it was and the parameters
unchanged (a zero update). The window of losses and the count of skipped steps are part of the
optimizer state, so a checkpoint holds them and a resumed run skips what the uninterrupted one
skips.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from hammer.spikes import is_spike
from hammer.train_config import TrainConfig
from hammer.weight_decay import decays


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays(".".join(str(getattr(k, "key", k)) for k in path)), params)


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
    """The run's optimizer at a learning rate of 1; its `update` takes `loss=` (the step's
    objective, read when spike_skip is on)."""
    adamw = optax.adamw(lambda _: 1.0, b1=config.adam_beta1, b2=config.adam_beta2,
                        eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask)
    tx = adamw if not config.max_grad_norm else optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm), adamw)
    return skip_spikes(tx, config.spike_sigmas, config.spike_window) if config.spike_skip else tx
