"""Which parameters get weight decay: HF Trainer's rule (`get_decay_parameter_names`), written once
for both trainers as a predicate over parameter names.

Biases and norm scales are not decayed; matrices, embeddings and the head are. The names are HF's
(`model.layers.0.input_layernorm.weight`, the torch twin's own); the JAX model's dotted parameter
paths use HF's module names (`layers.0.input_layernorm.scale`), so the same patterns read both.
"""
from __future__ import annotations

import re

# transformers.Trainer.get_decay_parameter_names' patterns.
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decays(name: str) -> bool:
    """Whether the parameter called `name` (dotted) gets weight decay."""
    return not any(re.search(p, name.lower()) for p in NO_DECAY_PATTERNS)
