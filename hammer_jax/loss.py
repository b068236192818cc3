"""The training loss: mean next-token cross-entropy over every position of packed blocks, computed
in chunks so that the [tokens, vocab] float32 logits never exist at once, forward or backward.

Targets are the block shifted by one (the last position has none); nothing is masked. Each chunk of
positions runs the head and the cross-entropy under `jax.checkpoint` inside `lax.scan`: backward
keeps only the chunk's hidden states (already alive as the head's input) and recomputes its
logits, so one chunk's logits are the loss's whole transient memory. For HammerLLM (vocab 105789)
at 8 x 2048 tokens a device, the float32 logits alone would be 6.9 GB, their gradient as much again.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def loss_sums(model, input_ids, chunk_tokens: int, batch_shards: int = 1, segment_ids=None,
              positions=None):
    """(sum of next-token NLL, sum of logsumexp(logits)^2, number of predicted tokens) of
    `input_ids` [b, s], the sums in float32. The second is what PaLM's z-loss averages; it
    comes from the same chunk's logits as the NLL. Packed documents: `segment_ids`, `positions`
    [b, s] as `Llama.features` takes them.

    A chunk covers all rows and `chunk_tokens // rows per device` positions, so that each device
    holds about `chunk_tokens` tokens' logits at once whatever the batch sharding."""
    hidden = model.features(input_ids, segment_ids, positions)[:, :-1]  # [b, n, embed]
    targets = input_ids[:, 1:]
    b, n, e = hidden.shape
    rows = max(1, b // batch_shards)
    chunk = max(1, min(n, chunk_tokens // rows))
    pad = -n % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, e).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)
    valid = (jnp.arange(n + pad) < n).reshape(-1, chunk)

    @jax.checkpoint
    def chunk_sums(h, t, v):
        logits = model.head(h).astype(jnp.float32)  # [b, chunk, vocab]
        picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.stack([jnp.sum(jnp.where(v, lse - picked, 0.0)), jnp.sum(jnp.where(v, lse * lse, 0.0))])

    def body(total, xs):
        return total + chunk_sums(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((2,), jnp.float32), (hidden, targets, valid))
    return total[0], total[1], b * n


def nll_sum(model, input_ids, chunk_tokens: int, batch_shards: int = 1):
    """(sum of next-token NLL in float32, number of predicted tokens) of `input_ids` [b, s]."""
    nll, _, count = loss_sums(model, input_ids, chunk_tokens, batch_shards)
    return nll, count


def reference_nll_sum(model, input_ids):
    """The same from all logits at once: the yardstick of the tests."""
    logits = model(input_ids)[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(picked), picked.size
