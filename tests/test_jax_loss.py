"""The chunked training loss equals the plain cross-entropy (value and every gradient), never holds
the batch's float32 logits, and the model's pad row and remat option behave as promised."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hammer.config import ModelConfig
from hammer_jax.loss import nll_sum, reference_nll_sum
from hammer_jax.model import Llama
from tests.train_fixtures import MODEL

CONFIG = ModelConfig.from_hf(MODEL)


def batch(rows=3, seq=29, vocab=CONFIG.vocab_size, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (rows, seq)), jnp.int32)


def value_and_grads(loss, model, ids):
    graphdef, state = nnx.split(model)
    return jax.value_and_grad(lambda s: loss(nnx.merge(graphdef, s), ids)[0])(state)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 30, 10_000])
def test_chunked_loss_equals_plain_cross_entropy_in_value_and_gradients(chunk_tokens):
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    ids = batch()
    plain, plain_grads = value_and_grads(reference_nll_sum, model, ids)
    chunked, grads = value_and_grads(lambda m, i: nll_sum(m, i, chunk_tokens), model, ids)
    assert nll_sum(model, ids, chunk_tokens)[1] == 3 * 28  # every position but the last of a row
    np.testing.assert_allclose(chunked, plain, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):  # float32 sum order
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * max(1.0, float(np.abs(b).max())))


def test_chunked_loss_backward_never_holds_the_float32_logits():
    # A vocabulary large against the model, so that the logits dominate: 8 x 63 x 32003 float32
    # logits are 64.5 MB; the head's weight and its gradient 8.2 MB each.
    config = CONFIG.replace(vocab_size=32003)
    graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
    ids = batch(rows=8, seq=64, vocab=32003)
    logits_bytes = 8 * 63 * 32003 * 4

    def temp_bytes(loss):
        grad = jax.jit(jax.grad(lambda s: loss(nnx.merge(graphdef, s), ids)[0]))
        return grad.lower(state).compile().memory_analysis().temp_size_in_bytes

    chunked = temp_bytes(lambda m, i: nll_sum(m, i, 64))
    plain = temp_bytes(reference_nll_sum)
    assert plain > 2 * logits_bytes  # the yardstick holds logits, softmax and their gradient
    assert chunked < logits_bytes / 2, (chunked, logits_bytes)  # measured 31.6 MB of 64.5 MB


def test_pad_row_starts_at_zero_and_the_lookup_gives_it_no_gradient():
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    table = model.embed_tokens.embedding[...]
    real = table[1:CONFIG.vocab_size]  # the rows past the vocabulary are its zero padding
    assert CONFIG.pad_token_id == 0 and not np.any(table[0]) and np.all(np.any(real, axis=1))
    ids = jnp.array([[1, 5, 0, 0, 9, 3]], jnp.int32)
    _, grads = value_and_grads(reference_nll_sum, model, ids)
    embed_grad = grads["embed_tokens"]["embedding"][...]
    assert not np.any(embed_grad[0]) and np.any(embed_grad[5])


def test_pad_row_of_a_tied_head_still_learns_through_the_head():
    model = Llama(CONFIG.replace(tie_word_embeddings=True), rngs=nnx.Rngs(0))
    _, grads = value_and_grads(reference_nll_sum, model, jnp.array([[1, 0, 4, 7]], jnp.int32))
    assert np.any(grads["embed_tokens"]["embedding"][...][0])


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [False, True])
def test_remat_changes_memory_not_numbers(scan_layers):
    ids = batch(rows=2, seq=16)
    results, checkpoints = {}, {}
    for remat in ("none", "dots", "full"):
        model = Llama(CONFIG, rngs=nnx.Rngs(0), scan_layers=scan_layers, remat=remat)
        graphdef, state = nnx.split(model)
        grad_fn = jax.grad(lambda s: nll_sum(nnx.merge(graphdef, s), ids, 64)[0])
        results[remat] = grad_fn(state)
        checkpoints[remat] = len(re.findall(r"\b(?:checkpoint|remat2?)\[", str(jax.make_jaxpr(grad_fn)(state))))
    # the loss's chunk is one checkpoint in every variant; remat adds the layers'
    assert checkpoints["dots"] > checkpoints["none"] and checkpoints["full"] > checkpoints["none"]
    for remat in ("dots", "full"):
        for a, b in zip(jax.tree.leaves(results[remat]), jax.tree.leaves(results["none"])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * max(1.0, float(np.abs(b).max())))
