"""The JAX model and the twin compute the same function: same weights (through convert's one table),
same batch, float32; logits, loss and every parameter's gradient."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import convert  # noqa: E402
from hammer.config import ModelConfig  # noqa: E402
from hammer_jax import model_from_params  # noqa: E402
from hammer_jax.model import RMSNorm as JaxRMSNorm  # noqa: E402
from hammer_torch.checkpoint import from_tensors  # noqa: E402
from hammer_torch.loss import causal_lm_loss  # noqa: E402
from hammer_torch.model import RMSNorm as TwinRMSNorm  # noqa: E402
from tests.eval_fixtures import random_hf_tensors  # noqa: E402

CONFIGS = {
    "gqa_untied": ModelConfig(vocab_size=1013, hidden_size=96, intermediate_size=172, num_layers=2,
                              num_heads=8, num_kv_heads=2),
    "tied_rope_500k": ModelConfig(vocab_size=1031, hidden_size=84, intermediate_size=148,
                                  num_layers=2, num_heads=6, num_kv_heads=3, rope_theta=500000.0,
                                  tie_word_embeddings=True),
}


@nnx.jit
@nnx.value_and_grad(has_aux=True)
def jax_loss_and_grads(model, ids):
    logits = model(ids)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()
    return loss, logits


@pytest.mark.parametrize("name", CONFIGS)
def test_jax_model_and_twin_agree_in_logits_loss_and_every_gradient(name):
    config = CONFIGS[name]
    tensors = random_hf_tensors(config, std=0.12)  # every layer moves the logits (0.02 barely does)
    jax_model = model_from_params(config, convert.hf_to_jax(tensors, config), attention_impl="xla")
    twin = from_tensors(config, tensors, attn_impl="sdpa")
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 29))

    (jax_value, jax_logits), jax_grads = jax_loss_and_grads(jax_model, jnp.asarray(ids))
    twin_logits = twin(torch.from_numpy(ids)).detach().numpy()
    assert np.abs(jax_logits).max() > 1.0
    assert np.abs(np.asarray(jax_logits) - twin_logits).max() <= 1e-4

    twin_value = causal_lm_loss(twin, torch.from_numpy(ids), chunk_size=16)
    twin_value.backward()
    assert abs(twin_value.item() - float(jax_value)) <= 1e-5 * float(jax_value)

    # JAX gradients back to HF names through the same table the weights came through.
    jax_grads = convert.jax_to_hf(nnx.to_pure_dict(jax_grads), config)
    twin_grads = {n: p.grad.numpy() for n, p in twin.named_parameters()}
    assert set(jax_grads) == set(twin_grads)
    for n, g in jax_grads.items():
        assert np.linalg.norm(twin_grads[n] - g) <= 1e-4 * np.linalg.norm(g), n


def test_rmsnorm_in_bfloat16_rounds_bit_for_bit_as_transformers_in_both_backends():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    size, gen = 97, torch.Generator().manual_seed(0)
    hf = LlamaRMSNorm(size, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.2 * torch.randn(size, generator=gen))
        x = (3 * torch.randn(4, 37, size, generator=gen)).to(torch.bfloat16)
        expected = hf(x)
        twin = TwinRMSNorm(size, 1e-5).to(torch.bfloat16)
        twin.weight.copy_(hf.weight)
        assert torch.equal(twin(x), expected)
    norm = JaxRMSNorm(size, 1e-5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    norm.scale[...] = jnp.asarray(hf.weight.detach().float().numpy(), jnp.bfloat16)
    got = norm(jnp.asarray(x.float().numpy(), jnp.bfloat16))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), expected.float().numpy())
