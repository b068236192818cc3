"""`hammer parity`: a conversion passes on every backend, a perturbed one fails with exit 1,
`--json` is JSON, one directory alone is read by every backend, bad input exits 2."""
import dataclasses
import json

import numpy as np
import pytest

import convert
from hammer.cli import main

PERTURBED = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random tiny Llama saved by transformers, in float32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    # A wide initializer spreads the logits: greedy decoding meets no near-ties float32 could flip.
    config = LlamaConfig(vocab_size=307, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                         initializer_range=0.25, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("parity") / "hf"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def jax_dir(hf_dir):
    assert main(["convert", str(hf_dir), str(hf_dir.parent / "jax"), "--to", "jax"]) == 0
    return hf_dir.parent / "jax"


def parity(capsys, *argv):
    code = main(["parity", *map(str, argv)])
    return code, capsys.readouterr()


@pytest.mark.slow
def test_a_conversion_agrees_with_transformers_on_every_backend_and_json_says_so(hf_dir, jax_dir, capsys):
    code, out = parity(capsys, hf_dir, jax_dir, "--json", "--max-new-tokens", "12")
    assert code == 0, out.out
    result = json.loads(out.out)  # stdout is the JSON and nothing else
    assert result["ok"] and result["reference"] == {**result["reference"], "backend": "transformers",
                                                   "directory": "SRC", "dtype": "float32"}
    rows = {(r["backend"], r["directory"]): r for r in result["rows"]}
    assert sorted(rows) == [("hammer_jax", "DST"), ("hammer_jax", "SRC"), ("hammer_torch", "DST"),
                            ("hammer_torch", "SRC"), ("transformers", "SRC")]
    for row in rows.values():
        assert row["logits_rel"] <= 1e-5 and row["loss_rel"] <= 1e-6, row
        assert row["tokens"] == result["reference"]["tokens"] and len(row["tokens"]) == 12
    # The JAX model reads both directories to the same weights: the same numbers to the bit.
    assert rows["hammer_jax", "SRC"]["logits_max_abs"] == rows["hammer_jax", "DST"]["logits_max_abs"]


@pytest.mark.slow
def test_a_conversion_with_one_weight_scaled_by_1_01_fails_with_exit_1(hf_dir, tmp_path, capsys):
    config, tensors = convert.load_hf(hf_dir)
    tensors[PERTURBED] = tensors[PERTURBED] * np.float32(1.01)
    convert.save_jax(tmp_path / "jax", config, convert.hf_to_jax(tensors, config))
    code, out = parity(capsys, hf_dir, tmp_path / "jax", "--max-new-tokens", "4")
    assert code == 1
    lines = out.out.splitlines()
    assert lines[-1] == "parity: FAILED"
    verdicts = {tuple(line.split()[:2]): line.split()[-1] for line in lines
                if line.startswith(("hammer_", "transformers"))}
    assert verdicts == {("transformers", "SRC"): "ok", ("hammer_jax", "SRC"): "ok",
                        ("hammer_torch", "SRC"): "ok", ("hammer_jax", "DST"): "FAIL",
                        ("hammer_torch", "DST"): "FAIL"}


@pytest.mark.slow
def test_one_directory_alone_is_read_by_every_backend_in_float32_and_bfloat16(hf_dir, capsys):
    code, out = parity(capsys, hf_dir, "--bf16", "--json", "--batch-size", "3", "--seq-len", "20",
                       "--max-new-tokens", "4")
    result = json.loads(out.out)
    assert code == 0, out.out
    assert result["batch"]["shape"] == [3, 20] and list(result["directories"]) == ["SRC"]
    rows = {(r["backend"], r["dtype"]): r for r in result["rows"]}
    assert len(rows) == 6
    bf16 = rows["transformers", "bfloat16"]
    # bfloat16 is bounded by transformers' own bfloat16 error.
    assert bf16["logits_bound"] == pytest.approx(1.5 * bf16["logits_max_abs"])
    for backend in ("hammer_jax", "hammer_torch"):  # each bfloat16 run really ran in bfloat16
        assert rows[backend, "bfloat16"]["logits_max_abs"] > 10 * rows[backend, "float32"]["logits_max_abs"]


@pytest.mark.parametrize("argv,message", [
    (["--seq-len", "97"], "--seq-len must be in [2, 96]"),
    (["--text", "hello"], "--text needs a tokenizer and no tokenizer.model is in"),
    (["--max-new-tokens", "70", "--seq-len", "30"], "exceed the model's context of 96"),
])
def test_bad_input_is_one_line_and_exit_2(hf_dir, capsys, argv, message):
    code, out = parity(capsys, hf_dir, *argv)
    assert code == 2 and out.out == ""
    assert message in out.err and out.err.count("\n") == 1


def test_directories_of_two_different_models_are_bad_input(hf_dir, tmp_path, capsys):
    config, tensors = convert.load_hf(hf_dir)
    convert.save_hf(tmp_path / "other", dataclasses.replace(config, rope_theta=500000.0), tensors)
    code, out = parity(capsys, hf_dir, tmp_path / "other")
    assert code == 2 and "rope_theta 10000.0 vs 500000.0" in out.err
