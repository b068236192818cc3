"""The same weights give the same domain losses through the JAX model, the torch twin and transformers."""
import pytest

from hammer import eval as harness
from hammer.cli import main
from hammer.documents import read_documents
from hammer.tokenizer import Tokenizer
from tests.eval_fixtures import TEXTS, write_domain_files, write_model_dir


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny-llama-backends"), seed=1)


@pytest.fixture(scope="module")
def scorers(tiny_model_dir):
    import hammer_jax
    import hammer_torch
    from hammer_jax.scorer import JaxScorer
    from hammer_torch.scorer import TorchScorer

    return {"hf": TorchScorer.from_hf(tiny_model_dir),
            "torch": TorchScorer.from_twin(hammer_torch.from_pretrained(tiny_model_dir)),
            "jax": JaxScorer(hammer_jax.from_pretrained(tiny_model_dir))}


def test_jax_torch_and_hf_give_the_same_domain_losses_in_float32(tiny_model_dir, scorers):
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    domains = {"en": TEXTS[:2] + TEXTS[4:], "zh": TEXTS[2:4] * 3}
    results = {name: harness.evaluate(s, tokenizer, domains, batch_size=4) for name, s in scorers.items()}
    for backend in ("jax", "torch"):
        for domain in domains:
            assert results[backend][domain].scored_tokens == results["hf"][domain].scored_tokens
            assert results[backend][domain].loss == pytest.approx(results["hf"][domain].loss, rel=1e-4)
        assert results[backend].average_ppl == pytest.approx(results["hf"].average_ppl, rel=1e-4)


def test_jax_scorer_heads_a_slice_of_positions_at_a_time_with_the_same_result(
        tiny_model_dir, scorers):
    import hammer_jax
    from hammer_jax.scorer import JaxScorer

    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    whole = harness.evaluate(scorers["jax"], tokenizer, {"d": TEXTS}, batch_size=4)["d"]
    # A budget of 3 positions a slice forces many slices and a ragged last one.
    scorer = JaxScorer(hammer_jax.from_pretrained(tiny_model_dir), logits_budget=4 * 3 * 401)
    sliced = harness.evaluate(scorer, tokenizer, {"d": TEXTS}, batch_size=4)["d"]
    assert sliced.nll == pytest.approx(whole.nll, rel=1e-6)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_hammer_eval_runs_on_every_backend_with_the_numbers_of_transformers(
        tiny_model_dir, scorers, tmp_path, backend, capsys):
    import json

    files = write_domain_files(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model_dir), "--backend", backend, "--json",
                 "--data", *(f"{n}={f}" for n, f in files.items())]) == 0
    report = json.loads(capsys.readouterr().out)  # --json: the report is the whole of stdout
    expected = harness.evaluate(scorers["hf"], Tokenizer.from_pretrained(tiny_model_dir),
                                {n: read_documents(f) for n, f in files.items()})
    for name in files:
        assert report["domains"][name]["loss"] == pytest.approx(expected[name].loss, rel=1e-4)


def test_jax_scorer_sees_the_models_current_weights_without_recompiling(tiny_model_dir):
    import jax.numpy as jnp
    import hammer_jax
    from hammer_jax.scorer import JaxScorer, _token_scores

    model = hammer_jax.from_pretrained(tiny_model_dir)
    scorer = JaxScorer(model)
    tokenizer = Tokenizer.from_pretrained(tiny_model_dir)
    before = harness.evaluate(scorer, tokenizer, {"d": TEXTS[:4]})["d"].nll
    compiled = _token_scores._cache_size()
    model.norm.scale[...] = model.norm.scale[...] * 2.0  # what an optimizer step does to a Variable
    after = harness.evaluate(scorer, tokenizer, {"d": TEXTS[:4]})["d"].nll
    assert after != pytest.approx(before, rel=1e-3)
    assert _token_scores._cache_size() == compiled
