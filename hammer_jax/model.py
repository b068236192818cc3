"""Llama in Flax NNX, numerically the model transformers' `LlamaForCausalLM` computes.

Module and parameter names follow HF (embed_tokens, layers, self_attn.q_proj, mlp.gate_proj,
input_layernorm, post_attention_layernorm, norm, lm_head), so `convert/` is one readable table.
Kernels keep HF's [out, in] layout (torch's Linear), with heads as their own axis (q_proj kernel
[heads, head_dim, embed]): a checkpoint converts by reshapes alone, never a transpose, and XLA
contracts either layout at the same speed. Every parameter carries logical axis names (vocab,
embed, heads, kv_heads, head_dim, mlp, layers) in flax's `out_sharding` metadata;
`hammer_jax.sharding` maps them onto a mesh. RoPE uses HF's
rotate_half layout, so no q/k permutation exists anywhere. With `scan_layers=True` the decoder
layers are one module with stacked parameters (leading "layers" axis), run with `nnx.scan`:
one compiled layer instead of `num_layers`, the usual choice for deep models on TPU.

Packed documents (`features(ids, segment_ids, positions)`): every kernel keeps a token's attention
inside its document, XLA and the reference by a mask, cuDNN by the same mask taken as a bias beside
its causal one, splash by its segment ids; RoPE then reads each row's own positions.

The embedding and the head hold `padded_vocab_size(vocab_size, vocab_multiple)` rows (MaxText's
padding: 105789 -> 105856 for 128), so the vocabulary axis divides over the tensor axis of a mesh
instead of being replicated. The padded rows start at zero and `head` slices them off the logits,
so they get no gradient and stay zero; nothing outside this module sees them.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from convert.mapping import VOCAB_MULTIPLE, padded_vocab_size
from hammer.config import ModelConfig
from hammer_jax.per_shard import per_shard

ATTENTION_IMPLS = ("xla", "cudnn", "splash", "reference")
# What a decoder layer keeps for backward under activation checkpointing: "dots" keeps the
# projections' matmul outputs (recomputing norms, RoPE, softmax, SiLU), "full" keeps only the
# layer's input and recomputes the whole layer.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _init(config: ModelConfig, axes: tuple[str, ...]) -> nnx.Initializer:
    """HF's initializer, tagged with logical axes. Not sharded eagerly: placing parameters on a
    mesh is `hammer_jax.sharding`'s job, and a model must build without one."""
    return nnx.with_partitioning(nnx.initializers.normal(config.initializer_range), axes,
                                 eager_sharding=False)


def _vocab_init(config: ModelConfig, axes: tuple[str, ...], zero_pad_row: bool) -> nnx.Initializer:
    """HF's initializer for the real vocabulary (the first axis), zeros for the padded rows: the
    real rows are those of an unpadded model built from the same key. `zero_pad_row` zeroes the
    row of `pad_token_id`, as `nn.Embedding(padding_idx=pad)` leaves the embedding's."""
    normal = nnx.initializers.normal(config.initializer_range)

    def init(key, shape, dtype=jnp.float32):
        table = normal(key, (config.vocab_size, *shape[1:]), dtype)
        if zero_pad_row and config.pad_token_id is not None:
            table = table.at[config.pad_token_id].set(0)
        return jnp.pad(table, [(0, shape[0] - config.vocab_size)] + [(0, 0)] * (len(shape) - 1))

    return nnx.with_partitioning(init, axes, eager_sharding=False)


def default_attention_impl(dtype) -> str:
    """Splash attention (Pallas) on TPUs; cuDNN flash attention on GPUs, which runs only
    half-precision inputs; XLA elsewhere."""
    if jax.default_backend() == "tpu":
        return "splash"
    if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def attention(q, k, v, mask, impl: str, segment_ids=None):
    """q [b, t, heads, d], k/v [b, s, kv_heads, d] -> [b, t, heads, d]; grouped-query heads
    share K/V without copies. mask [t, s] (True = attend) or None for causal with t == s.
    segment_ids [b, t] (causal self-attention): a query attends only to keys of its segment."""
    if impl == "reference":
        if segment_ids is not None:
            mask = jnp.tril(segment_ids[:, :, None] == segment_ids[:, None, :])
        return reference_attention(q, k, v, mask)
    if impl == "splash" and mask is None:
        from hammer_jax.splash import splash_attention  # Pallas is imported only when used

        # Per shard of the mesh in context; Pallas interprets the kernel off TPU.
        return splash_attention(q, k, v, segment_ids=segment_ids,
                                interpret=jax.default_backend() != "tpu")
    if segment_ids is not None:
        def within_segments(q, k, v, ids):  # cuDNN takes the mask as a bias beside its causal one
            same = ids[:, None, :, None] == ids[:, None, None, :]  # [b, 1, t, s]
            return jax.nn.dot_product_attention(q, k, v, mask=same, is_causal=True,
                                                implementation=impl)

        if impl == "cudnn":
            return per_shard(within_segments, q, k, v, segment_ids=segment_ids)
        return within_segments(q, k, v, segment_ids)
    if impl == "cudnn" and mask is None:
        return per_shard(functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                           implementation="cudnn"), q, k, v)
    if mask is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    # cuDNN takes no arbitrary mask; decoding against a cache is memory-bound, so XLA loses little.
    return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation="xla")


def reference_attention(q, k, v, mask):
    """Plain einsum softmax attention in float32, the yardstick for the kernels."""
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    if mask is not None and mask.ndim == 3:  # one mask per batch row: [b, t, s]
        mask = mask[:, None, None]
    q = q.reshape(b, t, kv_heads, heads // kv_heads, d).astype(jnp.float32)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(jnp.float32)) / jnp.sqrt(d)
    if mask is None:
        mask = jnp.tril(jnp.ones((t, k.shape[1]), bool))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(logits, axis=-1), v.astype(jnp.float32))
    return out.reshape(b, t, heads, d).astype(v.dtype)


def rope(positions, head_dim: int, theta: float):
    """cos, sin [..., t, head_dim] of positions [..., t] ([t], or [b, t] with a row's own) in
    float32, HF's layout: frequencies repeated over both halves."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [b, t, heads, d] rotated by position, computed in float32 (HF's rotate_half)."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * cos[..., None, :] + rotated * sin[..., None, :]).astype(x.dtype)


class RMSNorm(nnx.Module):
    """Statistics in float32 whatever the compute dtype (bf16 squares lose the small features),
    then HF's order: back to the input dtype, times the scale. A bfloat16 model thus rounds here
    exactly as transformers' LlamaRMSNorm does. Written out so that this does not hang on
    nnx.RMSNorm's dtype promotion."""

    def __init__(self, size: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((size,), param_dtype), out_sharding=("embed",),
                               eager_sharding=False)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * normed.astype(x.dtype)).astype(self.dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["keys", "values", "length"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    keys: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    values: jax.Array  # [layers, batch, max_len, kv_heads, head_dim]
    length: jax.Array  # int32 scalar: tokens cached so far, shared by the batch


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs, dtype, param_dtype, impl: str):
        e, h, kv, d = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim

        def proj(spec, shape, axes):
            return nnx.Einsum(spec, shape, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_init(config, axes), rngs=rngs)

        self.q_proj = proj("bse,hde->bshd", (h, d, e), ("heads", "head_dim", "embed"))
        self.k_proj = proj("bse,hde->bshd", (kv, d, e), ("kv_heads", "head_dim", "embed"))
        self.v_proj = proj("bse,hde->bshd", (kv, d, e), ("kv_heads", "head_dim", "embed"))
        self.o_proj = proj("bshd,ehd->bse", (e, h, d), ("embed", "heads", "head_dim"))
        self.impl = impl

    def __call__(self, x, cos, sin, cache: KVCache | None = None, layer=None, segment_ids=None):
        """x [b, t, embed]. With a cache, the t new tokens sit at positions cache.length.., are
        written into layer `layer` of it and attend to everything that layer holds. With
        segment_ids [b, t] (no cache), tokens attend within their segment only."""
        q = apply_rope(self.q_proj(x), cos, sin)
        k = apply_rope(self.k_proj(x), cos, sin)
        v = self.v_proj(x)
        if cache is None:
            return self.o_proj(attention(q, k, v, None, self.impl, segment_ids)), None
        # Written straight into the stacked buffers: slicing a layer out and setting it back
        # would copy that layer's whole cache on every step (decoding 5x slower on CPU, measured).
        start = (layer, 0, cache.length, 0, 0)
        keys = jax.lax.dynamic_update_slice(cache.keys, k[None].astype(cache.keys.dtype), start)
        values = jax.lax.dynamic_update_slice(cache.values, v[None].astype(cache.values.dtype), start)
        t, max_len = x.shape[1], keys.shape[2]
        mask = jnp.arange(max_len)[None, :] <= cache.length + jnp.arange(t)[:, None]
        out = attention(q, keys[layer].astype(q.dtype), values[layer].astype(q.dtype), mask, self.impl)
        return self.o_proj(out), KVCache(keys, values, cache.length)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs, dtype, param_dtype):
        e, m = config.hidden_size, config.intermediate_size

        def linear(n_in, n_out, axes):  # torch's Linear: kernel [out, in]
            return nnx.Einsum("...i,oi->...o", (n_out, n_in), dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_init(config, axes), rngs=rngs)

        self.gate_proj = linear(e, m, ("mlp", "embed"))
        self.up_proj = linear(e, m, ("mlp", "embed"))
        self.down_proj = linear(m, e, ("embed", "mlp"))

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs, dtype, param_dtype, impl: str):
        norm = functools.partial(RMSNorm, config.hidden_size, config.rms_norm_eps,
                                 dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = norm()
        self.self_attn = Attention(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                   impl=impl)
        self.post_attention_layernorm = norm()
        self.mlp = MLP(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, cache: KVCache | None = None, layer=None, segment_ids=None):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, segment_ids)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class Llama(nnx.Module):
    """Token ids [b, s] -> logits [b, s, vocab]. `features` and `head` split the call so a
    trainer can compute a chunked cross-entropy without materializing all logits at once.
    `vocab_multiple` pads the embedding and head rows (1: unpadded)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention_impl: str | None = None,
                 scan_layers: bool = False, remat: str = "none",
                 vocab_multiple: int = VOCAB_MULTIPLE):
        impl = attention_impl or default_attention_impl(dtype)
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {impl!r} is not one of {ATTENTION_IMPLS}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat {remat!r} is not one of {tuple(REMAT_POLICIES)}")
        self.config, self.dtype, self.scan_layers, self.remat = config, dtype, scan_layers, remat
        self.vocab_rows = padded_vocab_size(config.vocab_size, vocab_multiple)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = nnx.Embed(self.vocab_rows, config.hidden_size, **kw,
                                      embedding_init=_vocab_init(config, ("vocab", "embed"), True),
                                      rngs=rngs)
        if scan_layers:
            @nnx.split_rngs(splits=config.num_layers)
            @nnx.vmap(axis_size=config.num_layers, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(rngs):
                return DecoderLayer(config, rngs=rngs, impl=impl, **kw)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(config, rngs=rngs, impl=impl, **kw)
                                    for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
        self.lm_head = None if config.tie_word_embeddings else nnx.Einsum(
            "...e,ve->...v", (self.vocab_rows, config.hidden_size), **kw,
            kernel_init=_vocab_init(config, ("vocab", "embed"), False), rngs=rngs)

    def __call__(self, input_ids):
        return self.head(self.features(input_ids))

    def features(self, input_ids, segment_ids=None, positions=None):
        """[b, s] -> final-norm hidden states [b, s, embed]. Packed documents: with
        segment_ids and positions [b, s] (`hammer.data.loader.documents`), each token attends
        only to its own document, at RoPE positions that restart with it."""
        if positions is None:
            positions = jnp.arange(input_ids.shape[1])
        x, _ = self._decoder(input_ids, positions, None, segment_ids)
        return x

    def head(self, features):
        """[..., embed] -> logits [..., vocab] in the compute dtype, the padded rows sliced off."""
        if self.lm_head is None:
            logits = self.embed_tokens.attend(features)
        else:
            logits = self.lm_head(features)
        return logits[..., :self.config.vocab_size]

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        shape = (c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim)
        dtype = dtype or self.dtype  # two buffers: a step may donate both
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def decode(self, input_ids, cache: KVCache):
        """Runs t new tokens [b, t] at positions cache.length.., attending causally to the
        cached and new tokens -> (logits [b, t, vocab], cache advanced by t). Prefill is one
        call with the prompt. The caller keeps cache.length + t <= max_len: under jit the length
        is traced, so this cannot check it, and past the end XLA clamps the write position
        (overwriting the last entries) rather than fail; `hammer_jax.generate` checks it."""
        positions = cache.length + jnp.arange(input_ids.shape[1])
        x, cache = self._decoder(input_ids, positions, cache)
        return self.head(x), dataclasses.replace(cache, length=cache.length + input_ids.shape[1])

    def embed(self, input_ids):
        """Token embeddings; the pad token's row gets no gradient from the lookup, as with
        transformers' `nn.Embedding(padding_idx=pad)` (a tied head still trains it)."""
        x = self.embed_tokens(input_ids)
        pad = self.config.pad_token_id
        if pad is None:
            return x
        return jnp.where((input_ids == pad)[..., None], jax.lax.stop_gradient(x), x)

    def _decoder(self, input_ids, positions, cache: KVCache | None, segment_ids=None):
        x = self.embed(input_ids)
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta)

        def step(layer, x, cache, i):
            return layer(x, cos, sin, cache, i, segment_ids)

        if cache is None and self.remat != "none":  # training: a decoding step keeps nothing
            step = nnx.remat(step, policy=REMAT_POLICIES[self.remat])
        if self.scan_layers:
            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
            def run(carry, layer, i):
                x, cache = carry
                return step(layer, x, cache, i)

            x, cache = run((x, cache), self.layers, jnp.arange(self.config.num_layers))
        else:
            for i, layer in enumerate(self.layers):
                x, cache = step(layer, x, cache, i)
        return self.norm(x), cache
