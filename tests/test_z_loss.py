"""z-loss (PaLM's auxiliary loss, z_loss x mean(logsumexp(logits)^2)) computed inside the chunked
cross-entropy of both backends: its value and the gradients of the objective equal autodiff of the
unchunked formula, the cross-entropy beside it is unchanged, and no [tokens, vocab] array is kept."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hammer.config import ModelConfig
from hammer_jax.loss import loss_sums, nll_sum
from hammer_jax.model import Llama
from tests.train_fixtures import MODEL

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

from hammer_torch.loss import chunked_cross_entropy, chunked_losses  # noqa: E402

CONFIG = ModelConfig.from_hf(MODEL)
WEIGHT = 0.3  # large against 1e-4, so that the z term moves the gradients visibly


def unchunked_objective(model, ids):
    """(mean NLL + WEIGHT * mean(logsumexp^2), mean NLL, mean(logsumexp^2)) from all logits at once."""
    logits = model(ids)[:, :-1].astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
    nll, z = jnp.mean(lse - picked), jnp.mean(lse * lse)
    return nll + WEIGHT * z, (nll, z)


def chunked_objective(model, ids, chunk_tokens):
    nll, z, count = loss_sums(model, ids, chunk_tokens)
    return (nll + WEIGHT * z) / count, (nll / count, z / count)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_tokens", [7, 10_000])
def test_jax_z_loss_and_its_gradients_equal_autodiff_of_the_unchunked_formula(chunk_tokens):
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, (3, 29)), jnp.int32)
    graphdef, state = nnx.split(model)

    def value_and_grads(fn):
        return jax.jit(jax.value_and_grad(lambda s: fn(nnx.merge(graphdef, s)), has_aux=True))(state)

    (want, (want_nll, want_z)), want_grads = value_and_grads(lambda m: unchunked_objective(m, ids))
    (got, (got_nll, got_z)), grads = value_and_grads(lambda m: chunked_objective(m, ids, chunk_tokens))
    assert float(want_z) > 25  # logsumexp ~ log(259) = 5.6: the term is not small
    np.testing.assert_allclose(got_z, want_z, rtol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_nll, nll_sum(model, ids, chunk_tokens)[0] / (3 * 28), rtol=1e-7)
    (_, _), nll_only_grads = value_and_grads(lambda m: (unchunked_objective(m, ids)[1][0], (0, 0)))
    moved = []
    for a, b, c in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), jax.tree.leaves(nll_only_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * max(1.0, float(np.abs(b).max())))
        moved.append(float(np.abs(b - c).max()))
    assert max(moved) > 1e-3  # the z term is in the gradients


VOCAB, HIDDEN = 1013, 44


def torch_inputs():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 29, HIDDEN, generator=gen, requires_grad=True)
    weight = (0.2 * torch.randn(VOCAB, HIDDEN, generator=gen)).requires_grad_()
    targets = torch.randint(0, VOCAB, (3, 29), generator=gen)
    targets[0, :5] = -100  # ignored positions count in neither mean
    return features, weight, targets


@pytest.mark.parametrize("chunk_size", [10, 1024])
def test_torch_z_loss_and_its_gradients_equal_autodiff_of_the_unchunked_formula(chunk_size):
    features, weight, targets = torch_inputs()
    logits = (features @ weight.T).float().reshape(-1, VOCAB)
    keep = targets.reshape(-1) != -100
    want_ce = F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100)
    want_z = WEIGHT * torch.logsumexp(logits, dim=-1)[keep].pow(2).mean()
    want_grads = torch.autograd.grad(want_ce + want_z, (features, weight))
    ce, z = chunked_losses(features, weight, targets, chunk_size, z_loss=WEIGHT)
    grads = torch.autograd.grad(ce + z, (features, weight))
    assert abs(z.item() - want_z.item()) <= 1e-6 * want_z.item() and want_z.item() > 1
    assert ce.item() == chunked_cross_entropy(features, weight, targets, chunk_size).item()
    assert abs(ce.item() - want_ce.item()) <= 1e-6 * want_ce.item()
    for g, e in zip(grads, want_grads):
        assert (g - e).abs().max() <= 1e-6


def test_torch_z_loss_is_zero_and_costs_nothing_when_off_and_keeps_no_logits_when_on():
    features, weight, targets = torch_inputs()
    ce, z = chunked_losses(features, weight, targets, 16)
    assert z.item() == 0.0 and not z.requires_grad
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
        chunked_losses(features, weight, targets, 16, z_loss=1e-4)
    assert shapes and not [s for s in shapes if s[-1:] == (VOCAB,)]
