"""Every command that reads a model (convert, eval, generate, parity) takes a training run of
either backend or any of its checkpoints, the newest or an older one, and finds the model's config
and tokenizer there: a JAX step holds only params (the run holds the rest), a torch run holds no
config.json (each of its steps is a whole HF directory)."""
import json

import numpy as np
import pytest

import convert
from hammer.cli import main
from tests.tokenizer_fixtures import write_tiny_tokenizer
from tests.train_fixtures import (BLOCK_SIZE, TinyInputs, run_train, sentences, write_model_config,
                                  write_train_config)

pytestmark = pytest.mark.slow
VOCAB = 499  # the tiny SentencePiece model's


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step run of each backend with a tokenizer, a checkpoint after each step."""
    from hammer.data import prepare
    from tests.data_helpers import write_jsonl

    root = tmp_path_factory.mktemp("runs")
    tokenizer = root / "tokenizer"
    write_tiny_tokenizer(tokenizer, VOCAB)
    data = {}
    for name, count, seed in (("train", 200, 0), ("valid", 20, 1)):
        source = write_jsonl(root / f"{name}.jsonl", sentences(count, seed))
        prepare(str(tokenizer), [source], root / name, block_size=BLOCK_SIZE, blocks_per_shard=64)
        data[name] = root / name
    inputs = TinyInputs(write_model_config(root / "model.json", vocab_size=VOCAB), data["train"],
                        data["valid"])
    out = {}
    for backend in ("jax", "torch"):
        config = write_train_config(root / f"{backend}.toml", inputs, root / backend, backend=backend,
                                    steps=2, checkpoint_every=1, tokenizer=str(tokenizer))
        result = run_train(config)
        assert result.returncode == 0, result.stderr[-3000:]
        out[backend] = root / backend
    return out


# A JAX run directory holds its config and tokenizer itself (read in tests/test_jax_train.py, the demo).
PATHS = {"jax step": ("jax", "checkpoints/1"), "torch step": ("torch", "checkpoints/step_1"),
         "torch run": ("torch", ".")}


@pytest.mark.parametrize("which", PATHS)
def test_convert_eval_generate_and_parity_read_a_run_or_any_of_its_checkpoints(runs, which, tmp_path,
                                                                                 capsys):
    backend, relative = PATHS[which]
    path = runs[backend] / relative
    step = 1 if relative != "." else 2
    hf = tmp_path / "hf"
    assert main(["convert", str(path), str(hf), "--to", "hf"]) == 0
    _, exported = convert.load_hf(hf)
    newest = "checkpoints/2" if backend == "jax" else "checkpoints/step_2"
    _, own = convert.read_checkpoint(path)
    _, last = convert.read_checkpoint(runs[backend] / newest)
    np.testing.assert_array_equal(exported["lm_head.weight"], own["lm_head.weight"])
    # the step asked for, not the newest: one update apart
    assert (step == 2) == np.array_equal(own["lm_head.weight"], last["lm_head.weight"])
    assert (hf / "tokenizer.model").is_file()  # the run's tokenizer, carried along
    capsys.readouterr()

    (tmp_path / "d.jsonl").write_text(json.dumps({"text": sentences(1, 7)[0]}) + "\n")
    assert main(["eval", "--model", str(path), "--data", f"en={tmp_path / 'd.jsonl'}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # a JAX run keeps the tokenizer once, a torch run in every step
    holder = runs["jax"] if backend == "jax" else runs["torch"] / newest if step == 2 else path
    assert result["tokenizer"] == str(holder)
    assert np.isfinite(result["domains"]["en"]["loss"])

    assert main(["generate", "--model", str(path), "--prompt", "the cat", "--temperature", "0",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("the cat")

    assert main(["parity", str(path), str(hf), "--seq-len", "8", "--max-new-tokens", "2"]) == 0
    assert "parity: ok" in capsys.readouterr().out
