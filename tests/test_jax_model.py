"""The Flax Llama on its own: kernels agree, layouts agree, the cache reproduces the forward,
every parameter is named for sharding. Parity with transformers is in test_convert.py."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import convert
from hammer.config import ModelConfig
from hammer_jax import Llama, model_from_params, params_of
from hammer_jax.sharding import RULES, logical_to_spec
from tests.conftest import REPO
from tests.eval_fixtures import random_hf_tensors

# Prime-ish sizes so that a transposed or mis-reshaped weight cannot pass by symmetry.
GQA = ModelConfig(vocab_size=1013, hidden_size=96, intermediate_size=136, num_layers=2,
                  num_heads=8, num_kv_heads=2, rope_theta=500000.0)
TIED = ModelConfig(vocab_size=389, hidden_size=56, intermediate_size=92, num_layers=2,
                   num_heads=4, num_kv_heads=4, tie_word_embeddings=True)
LOGICAL_AXES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers"}


def tokens(config, shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, config.vocab_size)


def random_model(config, seed=0, **options):
    """Random weights drawn by numpy, so that tests compile no initializer."""
    hf = random_hf_tensors(config, std=0.05, seed=seed)
    params = convert.hf_to_jax(hf, config, options.get("scan_layers", False))
    return model_from_params(config, params, **options)


forward = nnx.jit(lambda model, ids: model(ids))
decode = nnx.jit(lambda model, ids, cache: model.decode(ids, cache))


@pytest.fixture(scope="module", params=[GQA, TIED], ids=["gqa", "tied"])
def model(request):
    return random_model(request.param, attention_impl="xla")


def test_xla_attention_equals_the_einsum_reference(model):
    ids = tokens(model.config, (2, 17))
    reference = model_from_params(model.config, params_of(model), attention_impl="reference")
    diff = jnp.abs(forward(model, ids) - forward(reference, ids)).max()
    assert diff < 1e-5, diff


def test_features_are_transformers_final_hidden_states_and_head_gives_its_logits_slice_by_slice(model):
    """The split a chunked loss relies on: features are the final-norm hidden states, and the head maps
    any slice of positions to those positions' logits, as transformers' model and lm_head do."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = model.config
    hf = LlamaForCausalLM(LlamaConfig(**config.to_hf())).eval()
    state = {k: torch.from_numpy(v) for k, v in random_hf_tensors(config, std=0.05, seed=0).items()}
    hf.load_state_dict(state, strict=not config.tie_word_embeddings)  # a tied model has no lm_head entry
    ids = tokens(config, (3, 7))
    with torch.no_grad():
        hidden = hf.model(torch.from_numpy(np.asarray(ids, np.int64))).last_hidden_state
        expected = hf.lm_head(hidden).numpy()
    features = nnx.jit(lambda m, ids: m.features(ids))(model, ids)
    assert features.shape == (3, 7, config.hidden_size)
    np.testing.assert_allclose(features, hidden.numpy(), atol=1e-5)
    head = nnx.jit(lambda m, f: m.head(f))
    for part in (slice(0, 3), slice(3, 7)):  # the head is per position: chunks give the whole
        np.testing.assert_allclose(head(model, hidden[:, part].numpy()), expected[:, part], atol=1e-5)
    logits = forward(model, ids)
    assert logits.shape == (3, 7, config.vocab_size)
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert np.abs(expected).max() > 0.5  # logits large enough for the bounds to mean something


def test_scanned_layers_compute_the_same_logits_as_a_layer_list(model):
    stacked = convert.hf_to_jax(convert.jax_to_hf(params_of(model), model.config), model.config,
                                scan_layers=True)
    scanned = model_from_params(model.config, stacked, attention_impl="xla", scan_layers=True)
    assert scanned.layers.self_attn.q_proj.kernel.shape[0] == model.config.num_layers
    ids = tokens(model.config, (2, 9))
    assert jnp.abs(forward(scanned, ids) - forward(model, ids)).max() < 1e-5


@pytest.mark.parametrize("scan_layers", [False, True], ids=["list", "scan"])
def test_prefill_then_single_token_steps_reproduce_the_full_forward(scan_layers):
    config = GQA
    model = random_model(config, seed=1, attention_impl="xla", scan_layers=scan_layers)
    ids = tokens(config, (2, 12), seed=3)
    cache = model.init_cache(batch_size=2, max_len=16)
    logits, cache = decode(model, ids[:, :7], cache)
    steps = [logits]
    for t in range(7, 12):
        logits, cache = decode(model, ids[:, t:t + 1], cache)
        steps.append(logits)
    assert int(cache.length) == 12
    diff = jnp.abs(jnp.concatenate(steps, axis=1) - forward(model, ids)).max()
    assert diff < 1e-5, diff


def test_cached_decoding_with_the_reference_kernel_matches_too():
    model = random_model(TIED, seed=2, attention_impl="reference")
    ids = tokens(TIED, (1, 6), seed=4)
    cache = model.init_cache(1, 8)
    first, cache = decode(model, ids[:, :4], cache)
    rest, cache = decode(model, ids[:, 4:], cache)
    assert jnp.abs(jnp.concatenate([first, rest], 1) - forward(model, ids)).max() < 1e-5


def test_the_stepper_refuses_decoding_past_its_cache_instead_of_overwriting_it():
    from hammer_jax.generate import JaxStepper

    model = random_model(TIED, seed=2, attention_impl="xla")
    ids = np.asarray(tokens(TIED, (1, 4), seed=4))[0].tolist()
    step = JaxStepper(model, max_len=4)
    step(ids[:2])
    with pytest.raises(ValueError, match="3 new tokens after 2 cached exceed the cache's max_len 4"):
        step(ids[1:])
    last = step(ids[2:])  # the refused call changed nothing; one compiled shape serves both calls
    np.testing.assert_allclose(last, np.asarray(forward(model, jnp.asarray([ids])))[0, -1], atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["list", "scan"])
def test_every_parameter_carries_logical_axis_names_one_per_dimension(scan_layers):
    model = nnx.eval_shape(lambda: Llama(GQA, rngs=nnx.Rngs(0), scan_layers=scan_layers))
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(leaves) == 3 + 9 * (1 if scan_layers else GQA.num_layers)
    for path, p in leaves:
        names = p.get_metadata()["out_sharding"]
        assert len(names) == len(p.shape) and set(names) <= LOGICAL_AXES, (path, names)
        stacked = scan_layers and path[0].key == "layers"
        assert (names[0] == "layers") == stacked and names.count("layers") == stacked, (path, names)


@pytest.mark.parametrize("scan_layers", [False, True], ids=["list", "scan"])
def test_hammerllm_1_4b_builds_abstractly_with_1_402_288_128_parameters(scan_layers):
    """Plus the zero rows of its padded vocabulary (105789 -> 105856) in the embedding and head."""
    config = ModelConfig.from_hf(REPO / "configs" / "hammerllm-1.4b.json")
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), scan_layers=scan_layers))
    padding = 2 * (105856 - 105789) * config.hidden_size
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == 1_402_288_128 + padding


def test_bfloat16_compute_errs_about_as_transformers_own_bfloat16():
    """Weights exact in bfloat16, so both errors are the activations' roundings alone (measured 1.00x
    transformers' mean error). transformers rounds RoPE's cos/sin to bfloat16 itself, and under jit
    XLA's CPU fusions keep a bfloat16 norm's arithmetic in float32: the next test, not this bound,
    catches RoPE or RMSNorm written in bfloat16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_tensors = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
                  for k, v in random_hf_tensors(GQA, std=0.05, seed=3).items()}
    params = convert.hf_to_jax(hf_tensors, GQA, False)
    bf16 = model_from_params(GQA, params, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl="xla")
    ids = np.random.default_rng(3).integers(0, GQA.vocab_size, (2, 37))
    reference = np.asarray(forward(model_from_params(GQA, params, attention_impl="xla"), jnp.asarray(ids)))
    logits = forward(bf16, jnp.asarray(ids))
    assert logits.dtype == jnp.bfloat16
    ours = np.abs(np.asarray(logits, np.float32) - reference).mean()
    hf = LlamaForCausalLM(LlamaConfig(**GQA.to_hf())).eval()
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in hf_tensors.items()})
    with torch.no_grad():
        theirs = np.abs(hf.to(torch.bfloat16)(torch.from_numpy(ids)).logits.float().numpy() - reference).mean()
    assert ours <= 1.1 * theirs, (ours, theirs)


def test_bfloat16_rope_and_rmsnorm_compute_in_float32_and_round_once():
    """A bfloat16 rotation or bfloat16 norm statistics change about a quarter of the outputs."""
    from hammer_jax.model import RMSNorm, apply_rope, rope

    rng = np.random.default_rng(0)
    x = jnp.asarray(3 * rng.standard_normal((2, 40, 4, 32)), jnp.bfloat16)
    cos, sin = rope(jnp.arange(40), 32, 10000.0)
    x64, c64, s64 = np.asarray(x, np.float64), np.asarray(cos, np.float64), np.asarray(sin, np.float64)
    x1, x2 = np.split(x64, 2, axis=-1)
    exact = (x64 * c64[:, None] + np.concatenate([-x2, x1], -1) * s64[:, None]).astype(ml_dtypes.bfloat16)
    assert (np.asarray(apply_rope(x, cos, sin)) != exact).mean() < 0.01
    norm = RMSNorm(96, 1e-5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    norm.scale[...] = jnp.asarray(1 + 0.2 * rng.standard_normal(96), jnp.bfloat16)
    h = jnp.asarray(rng.standard_normal((4, 50, 96)) * np.logspace(-2, 2, 96), jnp.bfloat16)
    h64 = np.asarray(h, np.float64)
    normed = (h64 / np.sqrt((h64 ** 2).mean(-1, keepdims=True) + 1e-5)).astype(ml_dtypes.bfloat16)
    exact = np.asarray(norm.scale[...]) * normed  # bfloat16 times bfloat16, rounded once
    assert (np.asarray(norm(h)) != exact).mean() < 0.01


def test_params_with_a_wrong_shape_a_missing_or_an_extra_entry_are_refused_naming_the_path():
    params = params_of(random_model(TIED))
    params["norm"]["scale"] = np.ones(55, np.float32)
    with pytest.raises(convert.ConvertError, match=r"norm\.scale has shape \(55,\), expected \(56,\)"):
        model_from_params(TIED, params)
    del params["layers"][1]["mlp"]
    with pytest.raises(convert.ConvertError, match=r"missing JAX parameter layers\.1\.mlp\.down_proj"):
        model_from_params(TIED, params)
    with pytest.raises(convert.ConvertError, match=r"unexpected JAX parameter lm_head\.kernel"):
        model_from_params(TIED, {**params_of(random_model(TIED)), "lm_head": {"kernel": np.ones((56, 389))}})


def test_unknown_attention_implementation_is_refused_naming_it():
    with pytest.raises(ValueError, match="'flash'"):
        Llama(TIED, rngs=nnx.Rngs(0), attention_impl="flash")


SHARDED_SCRIPT = """
import jax, jax.numpy as jnp
from flax import nnx
from hammer.config import ModelConfig
from hammer_jax import Llama, model_from_params, params_of
from hammer_jax.sharding import make_mesh
from hammer_jax.train_step import random_params, state_layout
from jax.sharding import PartitionSpec as P
import optax
config = ModelConfig(vocab_size=1013, hidden_size=96, intermediate_size=136, num_layers=2,
                     num_heads=8, num_kv_heads=2)
assert jax.device_count() == 8, jax.devices()
assert dict(make_mesh({"fsdp": -1, "tensor": 2}).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
options = dict(attention_impl="xla", scan_layers=True)
make = lambda: Llama(config, rngs=nnx.Rngs(0), **options)
graphdef, shardings, _ = state_layout(make, optax.sgd(0.1), mesh)
params = random_params(make, shardings.params)  # each made in its shard, as the trainer does
q = params["layers"]["self_attn"]["q_proj"]["kernel"]
assert tuple(q.sharding.spec) == (None, "tensor", None, "fsdp"), q.sharding
assert q.addressable_shards[0].data.shape == (2, 4, 12, 48), q.addressable_shards[0].data.shape
plain = model_from_params(config, jax.device_get(params), **options)
assert len(plain.layers.self_attn.q_proj.kernel[...].sharding.device_set) == 1
ids = jax.random.randint(jax.random.key(0), (4, 9), 0, config.vocab_size)
forward = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))
diff = float(jnp.abs(forward(params, ids) - forward(params_of(plain), ids)).max())
assert diff < 1e-5, diff
moved = jax.device_put(params_of(plain), shardings.params)  # a loaded model placed on the mesh
down = moved["layers"]["mlp"]["down_proj"]["kernel"]
assert tuple(down.sharding.spec) == (None, "fsdp", "tensor"), down.sharding
assert float(jnp.abs(forward(moved, ids) - forward(params_of(plain), ids)).max()) < 1e-5
print("ok")
"""


def test_a_model_sharded_on_eight_devices_gives_the_unsharded_logits():
    # The fake device count is fixed when jax starts, so this runs in its own interpreter.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(SHARDED_SCRIPT)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.endswith("ok\n")


def test_two_logical_axes_on_one_mesh_axis_are_refused_and_every_model_axis_has_a_rule():
    assert logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    with pytest.raises(ValueError, match="'fsdp' on two dimensions"):
        logical_to_spec(("embed", "mlp"), {"embed": "fsdp", "mlp": "fsdp"})
    with pytest.raises(ValueError, match="'experts' has no sharding rule"):
        logical_to_spec(("experts", "embed"))
    assert LOGICAL_AXES <= set(RULES)
