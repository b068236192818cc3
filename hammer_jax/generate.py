"""KV-cache decoding of the JAX Llama for `hammer.sampling.generate`: the prompt in one call, then
one token a call, each through a step compiled once per input shape (prefill, then [1, 1]) and
model structure, shared by every stepper, so an evaluation that builds a stepper over a trainer's
current weights every few thousand steps compiles once."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class JaxStepper:
    """`step(ids) -> last logits` over a cache of `max_len` positions, for a batch of one."""

    def __init__(self, model, max_len: int):
        self._graphdef, self._state = nnx.split(model)
        self._init_cache = lambda: model.init_cache(1, max_len)
        self.max_len = max_len
        self.reset()

    def reset(self) -> None:
        """Forgets every token seen: the next call is a new prompt, with no new compilation."""
        self._cache, self.length = self._init_cache(), 0

    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        # Checked here, outside jit: inside, the length is traced and an overflowing write clamps.
        if self.length + len(ids) > self.max_len:
            raise ValueError(f"{len(ids)} new tokens after {self.length} cached exceed the "
                             f"cache's max_len {self.max_len}")
        logits, self._cache = decode_step(self._graphdef, self._state, jnp.asarray([ids], jnp.int32),
                                          self._cache)
        self.length += len(ids)
        return np.asarray(logits)


# The cache is rewritten every step; donating it lets XLA update it in place.
@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def decode_step(graphdef, state, ids, cache):
    logits, cache = nnx.merge(graphdef, state).decode(ids, cache)
    return logits[0, -1].astype(jnp.float32), cache
