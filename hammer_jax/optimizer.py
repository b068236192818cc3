"""HammerLLM's optimizer as optax pieces: global-norm clipping, then AdamW on the clamped cosine.

The schedule is `hammer.schedule.learning_rate` built from optax's own schedules: linear warmup
from 0, then a cosine from the peak to 0 over the remaining steps, clamped from below at
`min_lr_ratio` of the peak (not optax's warmup_cosine_decay_schedule, which rescales the cosine to
end at the floor). Update k (0-based) uses lr(k), so the first update uses lr(0) = 0 during
warmup, as HF Trainer's LambdaLR does.

Weight decay skips the parameters HF Trainer's `get_decay_parameter_names` skips: biases and norms,
matched by the same name patterns on the dotted parameter path (embeddings and the head decay).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from hammer.train_config import TrainConfig

# transformers.Trainer.get_decay_parameter_names' patterns.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    peak, warmup = config.lr, config.warmup_steps
    warm = optax.linear_schedule(0.0, peak, transition_steps=max(1, warmup))
    cosine = optax.cosine_decay_schedule(peak, decay_steps=max(1, config.steps - warmup))

    def clamped(step):
        return jnp.maximum(config.min_lr_ratio * peak, cosine(step))

    return optax.join_schedules([warm, clamped], [warmup])


def decays(path: str) -> bool:
    """Whether the parameter at dotted `path` gets weight decay (HF Trainer's rule)."""
    return not any(re.search(p, path.lower()) for p in NO_DECAY_PATTERNS)


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays(".".join(str(getattr(k, "key", k)) for k in path)), params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_beta1, b2=config.adam_beta2,
                        eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask)
    if not config.max_grad_norm:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
