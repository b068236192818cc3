"""Per-token NLL of the JAX Llama for the eval harness (`hammer.eval.Scorer`), and whether each token
is the model's greedy choice (lm-eval's `is_greedy`).

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
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from hammer.eval import LOGITS_BUDGET


class JaxScorer:
    """Scores with the model's current weights: a trainer's updates are seen by the next call."""

    fixed_shapes = True  # each new shape compiles

    def __init__(self, model, *, logits_budget: int = LOGITS_BUDGET):
        self.model, self.logits_budget = model, logits_budget
        self.max_length = model.config.max_position_embeddings

    def token_nll(self, input_ids: np.ndarray) -> np.ndarray:
        return self.token_scores(input_ids)[0]

    def token_scores(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`token_nll`'s float32 `[b, s-1]`, and bool `[b, s-1]`: ids[j+1] is the argmax after ids[:j+1].

        Parameters sharded over a mesh (a trainer's live state, on every process of a run) get the
        ids replicated on that mesh, and every process receives the whole result.
        """
        graphdef, state = nnx.split(self.model)
        ids = np.asarray(input_ids, np.int32)
        sharding = jax.tree.leaves(state)[0].sharding
        if isinstance(sharding, NamedSharding):
            ids = jax.device_put(ids, NamedSharding(sharding.mesh, P()))
        out = _token_scores(graphdef, state, jnp.asarray(ids), self.logits_budget)
        # A result spread over other processes' devices comes whole to each; a local one is whole already.
        return tuple(np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))
                     for x in out)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _token_scores(graphdef, state, ids, logits_budget: int):
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
        return jax.nn.logsumexp(logits, axis=-1) - picked, jnp.argmax(logits, axis=-1) == t

    nll, greedy = jax.lax.map(chunk_nll, (hidden.swapaxes(0, 1), targets.swapaxes(0, 1)))
    return tuple(x.swapaxes(0, 1).reshape(b, -1)[:, :n] for x in (nll, greedy))
