"""hammer: backend-free shared code (config, tokenizer, data, eval, CLI).

Never imports jax or torch at module level; the backends live in `hammer_jax` and `hammer_torch`.
"""
from hammer.config import ConfigError, ModelConfig

__all__ = ["ConfigError", "ModelConfig"]
