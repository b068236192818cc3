"""Per-token NLL of the JAX Llama for the eval harness (`hammer.eval.Scorer`).

One compiled function per batch shape and model structure, shared by every scorer, so a trainer
that scores its live model every few thousand steps compiles once. The head runs over a slice of
positions at a time inside `lax.map`, so a batch of HammerLLM's 105789-way float32 logits (3.5 GB
for 4 x 2048 positions) never exists at once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hammer.eval import LOGITS_BUDGET


class JaxScorer:
    """Scores with the model's current weights: a trainer's updates are seen by the next call."""

    fixed_shapes = True  # each new shape compiles

    def __init__(self, model, *, logits_budget: int = LOGITS_BUDGET):
        self.model, self.logits_budget = model, logits_budget
        self.max_length = model.config.max_position_embeddings

    def token_nll(self, input_ids: np.ndarray) -> np.ndarray:
        graphdef, state = nnx.split(self.model)
        ids = jnp.asarray(input_ids, jnp.int32)
        return np.asarray(_token_nll(graphdef, state, ids, self.logits_budget))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _token_nll(graphdef, state, ids, logits_budget: int):
    model = nnx.merge(graphdef, state)
    hidden = model.features(ids)[:, :-1]  # [b, n, embed]
    targets = ids[:, 1:]
    b, n, e = hidden.shape
    chunk = max(1, min(n, logits_budget // (b * model.config.vocab_size)))
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, e)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk)

    def chunk_nll(args):
        h, t = args  # [b, chunk, embed], [b, chunk]
        logits = model.head(h).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - picked

    nll = jax.lax.map(chunk_nll, (hidden.swapaxes(0, 1), targets.swapaxes(0, 1)))
    return nll.swapaxes(0, 1).reshape(b, -1)[:, :n]
