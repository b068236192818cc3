"""Causal attention through the Pallas splash kernel that JAX ships for TPUs.

The kernel works on one batch element with heads leading ([heads, seq, head_dim]); its MQA form
takes the query heads of one KV head against that head's K/V ([seq, head_dim]), so grouped-query
attention is that form vmapped over batch and KV heads, and K/V are never repeated. The kernel
does not scale the logits: q is scaled by 1/sqrt(head_dim) first. A Pallas kernel sees only
local arrays, so under a mesh it runs per shard (`hammer_jax.per_shard`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    BlockSizes, CausalMask, MultiHeadMask, SegmentIds, make_splash_mqa_single_device)
from jax.sharding import AbstractMesh, Mesh

from hammer.errors import HammerError
from hammer_jax.per_shard import per_shard

LANES = 128  # the kernel tiles sequences in multiples of the TPU's 128 lanes
BLOCK = 512  # MaxText's default tile (sa_block_*), taken where it divides the length


def _kernel(group: int, seq_len: int, interpret: bool):
    """The forward and backward kernels of causal MQA for `group` query heads per KV head."""
    b = math.gcd(seq_len, BLOCK)
    sizes = BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                       block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = MultiHeadMask([CausalMask((seq_len, seq_len))] * group)
    return make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _local_attention(q, k, v, segment_ids=None, *, interpret: bool):
    """One shard: q [b, t, heads, d], k/v [b, t, kv_heads, d] -> [b, t, heads, d], t a
    multiple of the lane width; segment_ids [b, t] or None."""
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    kernel = _kernel(heads // kv_heads, t, interpret)
    q = (q * (1 / math.sqrt(d))).astype(q.dtype)
    q = q.reshape(b, t, kv_heads, heads // kv_heads, d).transpose(0, 2, 3, 1, 4)  # [b, kv, g, t, d]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, t, d]
    ids = None if segment_ids is None else SegmentIds(q=segment_ids, kv=segment_ids)

    def row(q, k, v, ids):  # one batch element, every KV head with the same segments
        return jax.vmap(lambda q, k, v: kernel(q, k, v, ids))(q, k, v)

    out = jax.vmap(row)(q, k, v, ids)  # [b, kv, g, t, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, heads, d)


def splash_attention(q, k, v, mesh: Mesh | AbstractMesh | None = None, *, segment_ids=None,
                     interpret: bool = False):
    """Causal attention, q [b, t, heads, d], k/v [b, t, kv_heads, d] -> [b, t, heads, d], as
    `hammer_jax.model.attention` takes it; with segment_ids [b, t], within each segment only. It
    runs per shard of `mesh` (axes among "data", "fsdp", "tensor"), by default the one in context,
    or on one device when none is. `interpret=True` runs the kernel off TPU (slowly), as the CPU
    tests do."""
    if k.shape[1] != q.shape[1]:
        raise HammerError(f"splash attention is causal self-attention: q has {q.shape[1]} "
                          f"positions, k/v {k.shape[1]}")
    t = q.shape[1]
    if t % LANES:
        # Padding at the end is exact: no real query reaches a later key under the causal mask.
        pad = ((0, 0), (0, -t % LANES), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        if segment_ids is not None:
            segment_ids = jnp.pad(segment_ids, pad[:2], constant_values=-1)
        return splash_attention(q, k, v, mesh, segment_ids=segment_ids, interpret=interpret)[:, :t]
    return per_shard(functools.partial(_local_attention, interpret=interpret), q, k, v, mesh,
                     segment_ids=segment_ids)
