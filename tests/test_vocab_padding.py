"""The JAX model pads its vocabulary (embedding and head rows) so the tensor axis divides it,
and nothing outside the model sees the padding: logits, loss and greedy generation are those of the
unpadded model, conversion pads on the way in and trims on the way out bit-exactly, and HammerLLM
1.4B on a (data, fsdp, tensor) = (1, 4, 2) mesh replicates no parameter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import convert
from hammer.cli import main
from hammer.config import ModelConfig
from hammer.sampling import Sampler, generate
from hammer_jax.checkpoint import from_pretrained, model_from_params, params_of, save_pretrained
from hammer_jax.generate import JaxStepper
from hammer_jax.loss import nll_sum
from hammer_jax.model import Llama
from tests.eval_fixtures import random_hf_tensors
from tests.train_fixtures import (run_json_script, run_train, train_losses,
                                  write_train_config)

# vocab 259 (the byte tokenizer's) pads to 384 by 128, to 512 by 256
CONFIG = ModelConfig(vocab_size=259, hidden_size=48, intermediate_size=88, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=12, pad_token_id=0)
TIED = CONFIG.replace(tie_word_embeddings=True)


def test_the_vocabulary_pads_to_a_multiple():
    assert convert.padded_vocab_size(105789) == 105856  # HammerLLM, by 128
    assert convert.padded_vocab_size(105789, 256) == 105984
    assert convert.padded_vocab_size(259, 128) == 384 and convert.padded_vocab_size(256, 128) == 256
    assert convert.padded_vocab_size(259, 1) == 259


@pytest.mark.parametrize("config", [CONFIG, TIED], ids=["untied", "tied"])
def test_logits_loss_and_gradients_equal_the_unpadded_models(config):
    padded = Llama(config, rngs=nnx.Rngs(5))
    plain = Llama(config, rngs=nnx.Rngs(5), vocab_multiple=1)
    assert padded.embed_tokens.embedding.shape == (384, 48)
    assert plain.embed_tokens.embedding.shape == (259, 48)
    # The same key draws the same real rows; the padded ones start at zero.
    assert np.array_equal(padded.embed_tokens.embedding[:259], plain.embed_tokens.embedding[...])
    assert not np.any(padded.embed_tokens.embedding[259:])
    if not config.tie_word_embeddings:
        assert np.array_equal(padded.lm_head.kernel[:259], plain.lm_head.kernel[...])
        assert not np.any(padded.lm_head.kernel[259:])

    ids = jax.random.randint(jax.random.key(1), (2, 17), 0, config.vocab_size)
    logits = padded(ids)
    assert logits.shape == (2, 17, 259)
    np.testing.assert_allclose(logits, plain(ids), rtol=0, atol=1e-6)

    def loss(model):
        total, count = nll_sum(model, ids, chunk_tokens=8)
        return total / count

    (loss_padded, grads), loss_plain = nnx.value_and_grad(loss)(padded), loss(plain)
    assert abs(float(loss_padded) - float(loss_plain)) <= 1e-6
    # The padded rows get no gradient, so AdamW and weight decay leave them at zero.
    assert not np.any(grads["embed_tokens"]["embedding"][...][259:])
    if not config.tie_word_embeddings:
        assert not np.any(grads["lm_head"]["kernel"][...][259:])


def test_greedy_generation_is_the_unpadded_models():
    padded = Llama(CONFIG, rngs=nnx.Rngs(2), vocab_multiple=256)
    plain = Llama(CONFIG, rngs=nnx.Rngs(2), vocab_multiple=1)

    def greedy(model):
        return generate(JaxStepper(model, max_len=40), [1, 77, 13, 200], max_new_tokens=24,
                        sampler=Sampler(temperature=0), eos_id=None)

    tokens = greedy(padded)
    assert len(tokens) == 24 and max(tokens) < 259
    assert tokens == greedy(plain)


@pytest.mark.parametrize("config", [CONFIG, TIED], ids=["untied", "tied"])
def test_hf_to_jax_to_hf_is_bit_exact_and_transformers_loads_the_export(config, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    source = random_hf_tensors(config, std=0.5, seed=3)
    convert.save_hf(tmp_path / "hf", config, source)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "jax"), "--to", "jax"]) == 0
    stored = convert.load_jax(tmp_path / "jax")[1]
    assert stored["embed_tokens"]["embedding"].shape == (384, 48)  # a JAX directory holds padding
    assert main(["convert", str(tmp_path / "jax"), str(tmp_path / "back"), "--to", "hf"]) == 0
    _, back = convert.load_hf(tmp_path / "back")
    assert sorted(back) == sorted(source)
    for name, x in source.items():
        assert back[name].shape == x.shape and back[name].tobytes() == x.tobytes(), name

    hf = LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 259, (2, 11))
    with torch.no_grad():
        expected = hf(torch.as_tensor(ids)).logits.numpy()
    model = from_pretrained(tmp_path / "jax")
    assert model.embed_tokens.embedding.shape == (384, 48)
    np.testing.assert_allclose(model(jnp.asarray(ids)), expected, rtol=0, atol=1e-4)


def test_jax_to_hf_to_jax_is_bit_exact(tmp_path):
    model = Llama(CONFIG, rngs=nnx.Rngs(4))
    save_pretrained(model, tmp_path / "jax")
    assert main(["convert", str(tmp_path / "jax"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert convert.load_hf(tmp_path / "hf")[1]["lm_head.weight"].shape == (259, 48)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "jax"]) == 0
    def flat(params):
        return {".".join(map(str, path)): np.asarray(x)
                for path, x in convert.mapping._flatten(params)}

    before, after = flat(params_of(model)), flat(convert.load_jax(tmp_path / "back")[1])
    assert sorted(before) == sorted(after)
    for name, x in before.items():
        assert after[name].shape == x.shape and after[name].tobytes() == x.tobytes(), name


def test_params_of_another_padding_load_and_wrong_ones_are_refused(tmp_path, train_inputs):
    """A checkpoint of a run on a 2-way tensor axis (256) loads on one device (128) and back."""
    wide = Llama(CONFIG, rngs=nnx.Rngs(6), vocab_multiple=256)
    save_pretrained(wide, tmp_path / "wide")
    narrow = from_pretrained(tmp_path / "wide")
    assert narrow.embed_tokens.embedding.shape == (384, 48)
    ids = jnp.arange(20).reshape(2, 10) * 12
    np.testing.assert_array_equal(narrow(ids), wide(ids))
    again = model_from_params(CONFIG, params_of(narrow), vocab_multiple=256)
    assert np.array_equal(again.lm_head.kernel[...], wide.lm_head.kernel[...])

    params = params_of(wide)
    kernel = np.array(params["lm_head"]["kernel"])
    kernel[300] = 1.0  # a padded row that is not zero: trimming it would lose weights
    params["lm_head"]["kernel"] = kernel
    nonzero = r"lm_head\.kernel has nonzero values in its padded rows past vocab_size 259"
    with pytest.raises(convert.ConvertError, match=nonzero):
        model_from_params(CONFIG, params)
    with pytest.raises(convert.ConvertError, match=nonzero):
        convert.jax_to_hf(params, CONFIG)
    params["lm_head"]["kernel"] = kernel[:200]  # fewer rows than the vocabulary
    with pytest.raises(convert.ConvertError, match=r"lm_head\.kernel has shape \(200, 48\), "
                                                   r"expected \(384, 48\)"):
        model_from_params(CONFIG, params)
    params["lm_head"]["kernel"] = np.zeros((512, 47), np.float32)
    with pytest.raises(convert.ConvertError, match=r"lm_head\.kernel has shape \(512, 47\)"):
        model_from_params(CONFIG, params)


SHARDING_SCRIPT = """
import json, warnings
import jax
from flax import nnx
from hammer.cli import main
from hammer.config import ModelConfig
from hammer_jax.model import Llama
from hammer_jax.sharding import make_mesh, model_shardings

config = ModelConfig.from_hf("configs/hammerllm-1.4b.json")
mesh = make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
out = {}
for multiple in (1, 256):  # unpadded, and as the trainer pads for this mesh
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), scan_layers=True,
                                         vocab_multiple=multiple))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shardings = model_shardings(model, mesh)
    specs = {".".join(map(str, path)): [list(a) if isinstance(a, tuple) else a for a in s.spec]
             for path, s in nnx.to_flat_state(shardings)}
    out[multiple] = {"warnings": [str(w.message) for w in caught], "specs": specs}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_hammerllm_1_4b_on_a_1_4_2_mesh_replicates_no_parameter():
    out = run_json_script(SHARDING_SCRIPT, devices=8, timeout=300)
    unpadded, padded = out["1"], out["256"]
    # Without padding the odd vocabulary (105789) leaves the embedding and the head replicated.
    assert len(unpadded["warnings"]) == 1 and "2 parameters" in unpadded["warnings"][0]
    assert padded["warnings"] == []
    specs = padded["specs"]
    assert specs["embed_tokens.embedding"] == ["tensor", "fsdp"]
    assert specs["lm_head.kernel"] == ["tensor", "fsdp"]
    for name, spec in specs.items():  # every matrix is split over both mesh axes
        if not name.endswith("scale"):
            assert "tensor" in spec and "fsdp" in spec, (name, spec)


@pytest.mark.slow
def test_a_run_keeps_its_padding_when_resumed_on_another_tensor_axis(tmp_path, train_inputs):
    """Trained on a 2-way tensor axis (rows 512), resumed on one (which alone would pad to 384):
    the run keeps 512 rows, its padded rows stay zero through AdamW, and convert trims them."""
    inputs = train_inputs
    run = tmp_path / "run"
    config = write_train_config(tmp_path / "c.toml", inputs, run, steps=2, schedule_steps=4,
                                eval_every=0, mesh={"data": 1, "fsdp": 1, "tensor": 2})
    first = run_train(config, devices=2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert convert.run_vocab_rows(run) == 512
    resumed = run_train(config, "steps=4", "mesh.tensor=1", "mesh.fsdp=2", devices=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "from step 2" in resumed.stderr
    losses = train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    _, params = convert.load_jax(run / "checkpoints" / "4")
    embedding, kernel = params["embed_tokens"]["embedding"], params["lm_head"]["kernel"]
    assert embedding.shape == (512, 64) and kernel.shape == (512, 64)
    assert not np.any(embedding[259:]) and not np.any(kernel[259:])
    assert np.any(kernel[:259] != 0)
    _, hf = convert.read_checkpoint(run)
    assert hf["model.embed_tokens.weight"].shape == (259, 64)
