"""Generation: the sampler, the token loop and its stopping rules, streamed text, greedy decoding equal
to transformers' on both backends, seeded top-p sampling, and the context limit."""
import io

import numpy as np
import pytest

from hammer.cli import main
from hammer.sampling import Sampler, TextStream, check_context, generate
from hammer.tokenizer import Tokenizer
from tests.eval_fixtures import MODEL_DIMS, write_model_dir

PROMPT = "The quick brown fox"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny-llama-generate"), seed=3)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return Tokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def hf_greedy(tiny_model_dir, tokenizer):
    """transformers' greedy continuation of PROMPT (EOS included if it stops there)."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.encode(PROMPT)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                         pad_token_id=0)
    new = out[0, len(prompt):].tolist()
    assert len(new) >= 12, "the fixture model should not stop at once, or the comparison means little"
    return new


def test_sampler_at_temperature_zero_is_argmax():
    logits = np.array([0.1, 2.0, -1.0, 1.999])
    assert [Sampler(0.0, seed=s)(logits) for s in range(5)] == [1] * 5


def test_top_p_draws_only_from_the_nucleus_in_proportion_to_its_probabilities():
    probs = np.array([0.1, 0.4, 0.2, 0.3])
    sampler = Sampler(1.0, top_p=0.65, seed=0)  # 0.4 + 0.3 reaches 0.65: tokens 1 and 3
    draws = np.array([sampler(np.log(probs)) for _ in range(4000)])
    assert set(draws.tolist()) == {1, 3}
    assert np.mean(draws == 1) == pytest.approx(4 / 7, abs=0.03)


def test_temperature_sharpens_and_flattens_the_distribution():
    logits = np.log(np.array([0.6, 0.4]))
    cold, hot = Sampler(0.25, seed=0), Sampler(4.0, seed=0)
    assert np.mean([cold(logits) == 0 for _ in range(2000)]) == pytest.approx(0.6**4 / (0.6**4 + 0.4**4), abs=0.03)
    assert np.mean([hot(logits) == 0 for _ in range(2000)]) == pytest.approx(0.6**.25 / (0.6**.25 + 0.4**.25), abs=0.03)


def test_a_seed_fixes_the_draws_and_another_seed_changes_them():
    logits = np.random.default_rng(0).normal(size=97)

    def draws(seed):
        sampler = Sampler(0.9, 0.95, seed)
        return [sampler(logits) for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5)])
def test_sampler_rejects_meaningless_settings(kwargs):
    with pytest.raises(ValueError):
        Sampler(**kwargs)


def test_generation_stops_at_eos_and_at_max_new_tokens():
    calls = []

    def step(ids):
        calls.append(list(ids))
        logits = np.zeros(5)
        logits[min(len(calls), 4)] = 1.0  # tokens 1, 2, 3, then EOS (4) forever
        return logits

    assert generate(step, [0, 0], max_new_tokens=10, sampler=Sampler(0), eos_id=4) == [1, 2, 3, 4]
    assert calls == [[0, 0], [1], [2], [3]]  # the prompt in one call, then one token a call
    calls.clear()
    assert generate(step, [0], max_new_tokens=2, sampler=Sampler(0), eos_id=4) == [1, 2]
    assert len(calls) == 2
    calls.clear()  # a stop condition (a stop string reached) ends it after the token that meets it
    assert generate(step, [0], max_new_tokens=10, sampler=Sampler(0), eos_id=4, stop=lambda new: 2 in new) == [1, 2]
    assert len(calls) == 2


def test_streamed_text_never_shows_half_a_character_and_adds_up_to_the_decoded_text(tokenizer):
    ids = tokenizer.encode("北京𝔘 fox 𝔘", add_special_tokens=False)
    out = io.StringIO()
    stream = TextStream(tokenizer, out)
    pieces = []
    for token in ids:
        stream.add(token)
        pieces.append(out.getvalue())
    stream.flush()
    assert out.getvalue() == tokenizer.decode(ids) == "北京𝔘 fox 𝔘"
    assert not any("\ufffd" in p for p in pieces)
    assert pieces.count("北京") == 4  # 𝔘 is four byte pieces: held back until the last one


def test_requests_longer_than_the_context_are_refused():
    check_context(100, 12, 112)
    with pytest.raises(ValueError, match=r"100 tokens \+ 13 new tokens = 113 exceed the model's context of 112"):
        check_context(100, 13, 112)


def test_torch_greedy_generation_equals_transformers(tiny_model_dir, tokenizer, hf_greedy):
    import hammer_torch
    from hammer_torch.generate import TorchStepper

    prompt = tokenizer.encode(PROMPT)
    step = TorchStepper(hammer_torch.from_pretrained(tiny_model_dir), len(prompt) + NEW_TOKENS)
    assert generate(step, prompt, max_new_tokens=NEW_TOKENS, sampler=Sampler(0), eos_id=2) == hf_greedy


def test_jax_greedy_generation_equals_transformers_with_one_compiled_decode_step(
        tiny_model_dir, tokenizer, hf_greedy):
    import hammer_jax
    from hammer_jax.generate import JaxStepper, decode_step

    prompt = tokenizer.encode(PROMPT)
    step = JaxStepper(hammer_jax.from_pretrained(tiny_model_dir), len(prompt) + NEW_TOKENS)
    decode_step.clear_cache()
    assert generate(step, prompt, max_new_tokens=NEW_TOKENS, sampler=Sampler(0), eos_id=2) == hf_greedy
    assert decode_step._cache_size() == 2  # the prefill shape and the one-token shape
    # Another stepper over the same structure (a trainer's next weights) compiles nothing new.
    again = JaxStepper(hammer_jax.from_pretrained(tiny_model_dir), len(prompt) + NEW_TOKENS)
    assert generate(again, prompt, max_new_tokens=NEW_TOKENS, sampler=Sampler(0), eos_id=2) == hf_greedy
    assert decode_step._cache_size() == 2


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_hammer_generate_streams_the_greedy_text_of_transformers(
        tiny_model_dir, tokenizer, hf_greedy, backend, capsys):
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--backend", backend,
                 "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(tokenizer.encode(PROMPT) + hf_greedy) + "\n"


def test_hammer_generate_top_p_with_a_seed_is_reproducible_and_backend_independent(tiny_model_dir, capsys):
    def sample(seed, backend):
        assert main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--backend", backend,
                     "--max-new-tokens", "16", "--temperature", "0.9", "--top-p", "0.8",
                     "--seed", str(seed)]) == 0
        return capsys.readouterr().out

    first = sample(11, "torch")
    assert sample(11, "torch") == first
    assert sample(11, "jax") == first
    assert sample(12, "torch") != first


def test_hammer_generate_refuses_a_prompt_that_does_not_fit_the_context(tiny_model_dir, capsys):
    context = MODEL_DIMS["max_position_embeddings"]
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", PROMPT, "--backend", "torch",
                 "--max-new-tokens", str(context)]) == 2
    err = capsys.readouterr().err
    assert f"exceed the model's context of {context}" in err and len(err.strip().splitlines()) == 1


def test_hammer_generate_never_samples_the_vocab_padding_and_refuses_a_bigger_tokenizer(
        tiny_model_dir, tokenizer, hf_greedy, hammerllm_dir, tmp_path, capsys):
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    # The fixture model with 8 padding rows whose logits (±30x four real rows) dwarf every real one.
    padded = tmp_path / "padded"
    shutil.copytree(tiny_model_dir, padded)
    weights = load_file(padded / "model.safetensors")
    head = weights["lm_head.weight"]
    extra = np.concatenate([30 * head[[5, 6, 7, 8]], -30 * head[[5, 6, 7, 8]]])
    weights["lm_head.weight"] = np.concatenate([head, extra])
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = np.concatenate([embed, np.zeros_like(extra)])
    save_file(weights, padded / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((padded / "config.json").read_text())
    (padded / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    assert main(["generate", "--model", str(padded), "--prompt", PROMPT, "--backend", "torch",
                 "--max-new-tokens", str(NEW_TOKENS), "--temperature", "0"]) == 0
    assert capsys.readouterr().out == tokenizer.decode(tokenizer.encode(PROMPT) + hf_greedy) + "\n"

    assert main(["generate", "--model", str(tiny_model_dir), "--tokenizer", str(hammerllm_dir / "tokenizer"),
                 "--prompt", PROMPT, "--backend", "torch"]) == 2
    assert "has 105789 pieces, more than the 401 of model" in capsys.readouterr().err
