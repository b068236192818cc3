"""HammerLLM's optimizer as optax pieces: global-norm clipping, then AdamW.

The learning rate is not in here: the train step takes it as an argument (the loop evaluates
`hammer.schedule`, the one definition both backends use), so one compiled step serves any lr,
schedule or run length. AdamW runs at a constant rate of 1, as a schedule so that its state keeps
the layout of checkpoints written when the schedule lived here, and the step scales its update.

Weight decay skips the parameters HF Trainer's `get_decay_parameter_names` skips: biases and norms,
matched by the same name patterns on the dotted parameter path (embeddings and the head decay).
"""
from __future__ import annotations

import re

import jax
import optax

from hammer.train_config import TrainConfig

# transformers.Trainer.get_decay_parameter_names' patterns.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decays(path: str) -> bool:
    """Whether the parameter at dotted `path` gets weight decay (HF Trainer's rule)."""
    return not any(re.search(p, path.lower()) for p in NO_DECAY_PATTERNS)


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays(".".join(str(getattr(k, "key", k)) for k in path)), params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lambda _: 1.0, b1=config.adam_beta1, b2=config.adam_beta2,
                        eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask)
    if not config.max_grad_norm:
        return adamw
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw)
