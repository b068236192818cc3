"""hammer's JAX backend: a Flax NNX Llama (`model`), checkpoints (`checkpoint`) and sharding."""
from hammer_jax.checkpoint import from_pretrained, model_from_params, params_of, save_pretrained
from hammer_jax.model import KVCache, Llama

__all__ = ["KVCache", "Llama", "from_pretrained", "model_from_params", "params_of",
           "save_pretrained"]
