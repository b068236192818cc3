"""HF <-> JAX conversion: transformers' logits reproduced, round trips exact, bad input refused.

Each HF model is built once per module (random LlamaForCausalLM -> save_pretrained) and goes
through `hammer convert` as a user runs it.
"""
import json
import shutil
from types import SimpleNamespace

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import convert
from hammer.cli import main
from hammer_jax import from_pretrained
from tests.eval_fixtures import random_hf_tensors

# Distinct, prime-ish sizes: a transposed or mis-reshaped weight cannot pass by symmetry.
CONFIGS = {
    "mha-tied": dict(vocab_size=1013, hidden_size=56, intermediate_size=92, num_attention_heads=4,
                     num_key_value_heads=4, tie_word_embeddings=True),
    "gqa4-theta500k": dict(vocab_size=1013, hidden_size=96, intermediate_size=136,
                           num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0),
    "gqa8": dict(vocab_size=389, hidden_size=80, intermediate_size=116, num_attention_heads=8,
                 num_key_value_heads=1),
}
MEASURED = {}  # max-abs differences, printed at the end of the module (pytest -s)
forward = nnx.jit(lambda model, ids: model(ids))


def build_hf(tmp_path_factory, name, **overrides):
    torch.manual_seed(sum(map(ord, name)))
    hf_config = LlamaConfig(**CONFIGS[name], num_hidden_layers=2, initializer_range=0.1,
                            max_position_embeddings=64, attn_implementation="eager", **overrides)
    model = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # norms at 1 would hide a lost or misplaced scale
        for param_name, p in model.named_parameters():
            if param_name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(name) / "hf"
    model.save_pretrained(path)
    ids = torch.randint(0, hf_config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits.numpy()
    return SimpleNamespace(name=name, path=path, model=model, ids=ids.numpy(), logits=logits)


@pytest.fixture(scope="module", params=list(CONFIGS))
def hf(request, tmp_path_factory):
    return build_hf(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def small_hf(tmp_path_factory):
    return build_hf(tmp_path_factory, "mha-tied")


@pytest.fixture(scope="module", autouse=True)
def report_measurements():
    yield
    for key, value in sorted(MEASURED.items()):
        print(f"{key}: {value:.3g}")


def hammer(*argv):
    return main(["convert", *map(str, argv)])


def test_jax_logits_equal_transformers_in_float32(hf, tmp_path):
    assert hammer(hf.path, tmp_path / "jax", "--to", "jax") == 0
    model = from_pretrained(tmp_path / "jax", attention_impl="xla")
    diff = float(np.abs(np.asarray(forward(model, jnp.asarray(hf.ids))) - hf.logits).max())
    MEASURED[f"float32 max-abs |jax - transformers| {hf.name}"] = diff
    assert diff <= 1e-4, diff
    assert np.abs(hf.logits).max() > 1  # logits large enough for the bound to mean something


def test_scanned_layers_load_from_hf_with_the_same_logits(small_hf):
    model = from_pretrained(small_hf.path, attention_impl="xla", scan_layers=True)
    diff = float(np.abs(np.asarray(forward(model, jnp.asarray(small_hf.ids))) - small_hf.logits).max())
    MEASURED["float32 max-abs |jax scanned - transformers| mha-tied"] = diff
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("saved_scanned", [False, True], ids=["saved-list", "saved-scan"])
def test_a_jax_directory_loads_in_either_layer_layout_with_the_same_logits(small_hf, tmp_path,
                                                                         saved_scanned):
    config, tensors = convert.load_hf(small_hf.path)
    convert.save_jax(tmp_path / "jax", config, convert.hf_to_jax(tensors, config, saved_scanned))
    for scan_layers in (False, True):
        model = from_pretrained(tmp_path / "jax", attention_impl="xla", scan_layers=scan_layers)
        diff = float(np.abs(np.asarray(forward(model, jnp.asarray(small_hf.ids))) - small_hf.logits).max())
        assert diff <= 1e-4, (scan_layers, diff)


def test_bfloat16_logits_err_no_more_than_transformers_own_bfloat16(hf):
    model = from_pretrained(hf.path, dtype=jnp.bfloat16, attention_impl="xla")
    ours = np.abs(np.asarray(forward(model, jnp.asarray(hf.ids)), np.float32) - hf.logits).max()
    with torch.no_grad():
        theirs_logits = LlamaForCausalLM.from_pretrained(hf.path, dtype=torch.bfloat16)(
            torch.as_tensor(hf.ids)).logits.float().numpy()
    theirs = np.abs(theirs_logits - hf.logits).max()
    MEASURED[f"bfloat16 max-abs |jax - transformers f32| {hf.name}"] = float(ours)
    MEASURED[f"bfloat16 max-abs |transformers bf16 - f32| {hf.name}"] = float(theirs)
    # Both round weights and activations to 8 mantissa bits; ours keeps RMSNorm and RoPE in
    # float32, so it should be no worse than transformers' own bfloat16 run (1.5x for luck of
    # the draw in which roundings line up).
    assert ours <= 1.5 * theirs, (ours, theirs)


def test_hf_to_jax_to_hf_gives_the_source_tensors_and_transformers_loads_them(hf, tmp_path):
    assert hammer(hf.path, tmp_path / "jax", "--to", "jax") == 0
    assert hammer(tmp_path / "jax", tmp_path / "hf", "--to", "hf") == 0
    config, source = convert.load_hf(hf.path)
    config_back, back = convert.load_hf(tmp_path / "hf")
    assert config_back == config and sorted(back) == sorted(source)
    for name in source:
        assert back[name].dtype == source[name].dtype and np.array_equal(back[name], source[name]), name
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                       attn_implementation="eager")
    assert not any(info.values()), info
    with torch.no_grad():
        assert torch.equal(model(torch.as_tensor(hf.ids)).logits,
                           hf.model(torch.as_tensor(hf.ids)).logits)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == 2


def random_params(config, dtype, scan_layers):
    return convert.hf_to_jax(random_hf_tensors(config, std=1.0, seed=7, dtype=dtype), config, scan_layers)


@pytest.mark.parametrize("dtype,scan_layers", [(np.float32, False), (ml_dtypes.bfloat16, True)],
                         ids=["float32-list", "bfloat16-scan"])
def test_jax_to_hf_to_jax_is_bit_identical(small_hf, tmp_path, dtype, scan_layers):
    config = convert.load_hf(small_hf.path)[0]
    params = random_params(config, dtype, scan_layers)
    convert.save_jax(tmp_path / "a", config, params)
    assert hammer(tmp_path / "a", tmp_path / "hf", "--to", "hf") == 0
    assert hammer(tmp_path / "hf", tmp_path / "b", "--to", "jax") == 0
    config_back, back = convert.load_jax(tmp_path / "b")
    assert config_back == config
    if scan_layers:  # the CLI writes per-layer; stacking again must give the same arrays
        back = convert.layer_layout(back, config, stacked=True)
    flat = dict(convert.mapping._flatten(params))
    flat_back = {tuple(int(k) if str(k).isdigit() else k for k in path): x
                 for path, x in convert.mapping._flatten(back)}
    assert sorted(flat, key=str) == sorted(flat_back, key=str)
    for path, x in flat.items():
        assert flat_back[path].dtype == x.dtype and np.array_equal(flat_back[path], x), path


def test_dtype_option_writes_bfloat16_that_round_trips_and_reads_back_without_torch(
        small_hf, tmp_path, monkeypatch):
    assert hammer(small_hf.path, tmp_path / "bf16", "--to", "hf", "--dtype", "bfloat16") == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert hammer(tmp_path / "bf16", tmp_path / "jax", "--to", "jax") == 0
    assert hammer(tmp_path / "jax", tmp_path / "back", "--to", "hf") == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype="auto").dtype == torch.bfloat16
    first, back = convert.load_hf(tmp_path / "bf16")[1], convert.load_hf(tmp_path / "back")[1]
    assert sorted(back) == sorted(first)
    for name, x in first.items():
        assert back[name].dtype == x.dtype and np.array_equal(back[name].view(np.uint16), x.view(np.uint16))
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # any `import torch` now fails
    _, tensors = convert.load_hf(tmp_path / "bf16")
    _, source = convert.load_hf(small_hf.path)
    for name, x in source.items():
        assert tensors[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(tensors[name], x.astype(ml_dtypes.bfloat16))


def test_a_float16_checkpoint_is_labelled_float16_and_round_trips_bit_exact(small_hf, tmp_path):
    assert hammer(small_hf.path, tmp_path / "f16", "--to", "hf", "--dtype", "float16") == 0
    assert hammer(tmp_path / "f16", tmp_path / "jax", "--to", "jax") == 0
    assert hammer(tmp_path / "jax", tmp_path / "back", "--to", "hf") == 0
    for out in ("f16", "jax", "back"):
        assert json.loads((tmp_path / out / "config.json").read_text())["torch_dtype"] == "float16", out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype="auto").dtype == torch.float16
    _, source = convert.load_hf(small_hf.path)
    _, back = convert.load_hf(tmp_path / "back")
    for name, x in source.items():
        assert back[name].dtype == np.float16, name
        assert np.array_equal(back[name].view(np.uint16), x.astype(np.float16).view(np.uint16)), name


def test_a_checkpoint_of_mixed_dtypes_keeps_each_tensors_dtype_and_claims_none(small_hf, tmp_path):
    _, source = convert.load_hf(small_hf.path)  # float32 norms, bfloat16 matrices, as some exporters do
    mixed = {n: x if n.endswith("norm.weight") else x.astype(ml_dtypes.bfloat16) for n, x in source.items()}
    copy_config(small_hf.path, tmp_path / "mixed")
    save_file(mixed, tmp_path / "mixed" / "model.safetensors", metadata={"format": "pt"})
    assert hammer(tmp_path / "mixed", tmp_path / "jax", "--to", "jax") == 0
    assert hammer(tmp_path / "jax", tmp_path / "back", "--to", "hf") == 0
    for out in ("jax", "back"):  # a float32 label would make transformers upcast the matrices
        written = json.loads((tmp_path / out / "config.json").read_text())
        assert "torch_dtype" not in written and "dtype" not in written, out
    _, back = convert.load_hf(tmp_path / "back")
    for name, x in mixed.items():
        assert back[name].dtype == x.dtype and back[name].tobytes() == x.tobytes(), name


def test_sharded_safetensors_are_read_and_written_with_an_index(small_hf, tmp_path):
    small_hf.model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    config, source = convert.load_hf(small_hf.path)
    _, sharded = convert.load_hf(tmp_path / "sharded")
    assert sorted(sharded) == sorted(source)
    assert all(np.array_equal(sharded[n], source[n]) for n in source)

    convert.save_hf(tmp_path / "out", config, source, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "out" / f).is_file() for f in files)
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in source.values())
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    assert torch.equal(model.model.norm.weight, small_hf.model.model.norm.weight)


def copy_config(src, dst):
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")


def test_pytorch_model_bin_in_bfloat16_with_compile_and_ddp_prefixes_is_read(small_hf, tmp_path):
    copy_config(small_hf.path, tmp_path / "bin")
    state = {f"module._orig_mod.{k}": v.to(torch.bfloat16)
             for k, v in small_hf.model.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    _, tensors = convert.load_hf(tmp_path / "bin")
    _, source = convert.load_hf(small_hf.path)
    assert sorted(tensors) == sorted(source)
    for name, x in source.items():
        np.testing.assert_array_equal(tensors[name], x.astype(ml_dtypes.bfloat16))


def test_prefixed_safetensors_are_stripped_but_a_name_twice_is_refused(small_hf, tmp_path):
    _, source = convert.load_hf(small_hf.path)
    copy_config(small_hf.path, tmp_path / "prefixed")
    save_file({f"_orig_mod.{k}": v for k, v in source.items()},
              tmp_path / "prefixed" / "model.safetensors")
    assert sorted(convert.load_hf(tmp_path / "prefixed")[1]) == sorted(source)
    copy_config(small_hf.path, tmp_path / "twice")
    save_file({**source, "module.model.norm.weight": source["model.norm.weight"]},
              tmp_path / "twice" / "model.safetensors")
    with pytest.raises(convert.ConvertError, match=r"model\.norm\.weight appears twice"):
        convert.load_hf(tmp_path / "twice")


def test_every_config_json_generation_gives_its_rope_theta(tmp_path_factory, tmp_path):
    hf = build_hf(tmp_path_factory, "gqa4-theta500k")
    written = json.loads((hf.path / "config.json").read_text())  # by whichever transformers is installed
    rope_keys = ("rope_parameters", "rope_theta", "rope_scaling")
    common = {k: v for k, v in written.items() if k not in rope_keys}
    transformers5 = {**common, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}
    transformers4 = {**common, "rope_theta": 500000.0, "rope_scaling": None}
    hammerllm = common
    for name, content, theta in [("t5", transformers5, 500000.0), ("t4", transformers4, 500000.0),
                                 ("hammerllm", hammerllm, 10000.0)]:
        shutil.copytree(hf.path, tmp_path / name)
        (tmp_path / name / "config.json").write_text(json.dumps(content))
        model = from_pretrained(tmp_path / name, attention_impl="xla")
        assert model.config.rope_theta == theta
        diff = np.abs(np.asarray(forward(model, jnp.asarray(hf.ids))) - hf.logits).max()
        assert (diff <= 1e-4) == (theta == 500000.0), (name, diff)


def test_a_tokenizer_that_is_not_sentencepiece_is_carried_through_both_formats_as_is(small_hf,
                                                                                    tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_hf.path, src)
    (src / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (src / "tokenizer_config.json").write_text('{"add_bos_token": true}')
    assert hammer(src, tmp_path / "jax", "--to", "jax") == 0
    assert hammer(tmp_path / "jax", tmp_path / "hf", "--to", "hf") == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "hf" / name).read_bytes() == (src / name).read_bytes()


def test_the_source_generation_config_is_carried_through_every_format(small_hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_hf.path, src)
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "max_length": 2048}
    (src / "generation_config.json").write_text(json.dumps(generation))  # HammerLLM's pad id lives here
    assert hammer(src, tmp_path / "jax", "--to", "jax") == 0
    assert hammer(tmp_path / "jax", tmp_path / "hf", "--to", "hf") == 0
    assert hammer(src, tmp_path / "torch", "--to", "torch") == 0
    for out in ("jax", "hf", "torch"):
        assert json.loads((tmp_path / out / "generation_config.json").read_text()) == generation


def test_without_one_the_generation_config_is_derived_from_the_model_config(small_hf, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(small_hf.path, src)
    (src / "generation_config.json").unlink(missing_ok=True)
    (src / "config.json").write_text(json.dumps({**json.loads((src / "config.json").read_text()),
                                                 "bos_token_id": 3, "eos_token_id": 4, "pad_token_id": 5}))
    assert hammer(src, tmp_path / "hf", "--to", "hf") == 0
    written = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (3, 4, 5)


@pytest.mark.parametrize("given", ["--tokenizer", "SRC's own files"])
def test_exported_tokenizer_encodes_in_transformers_as_hammer(small_hf, tmp_path, hammerllm_dir, given):
    from transformers import AutoTokenizer

    from hammer.tokenizer import Tokenizer

    if given == "--tokenizer":
        options = ["--tokenizer", hammerllm_dir / "tokenizer"]
    else:  # HammerLLM's released Llama-format files, which transformers 5 alone reads with other ids
        shutil.copytree(small_hf.path, tmp_path / "src")
        for f in (hammerllm_dir / "tokenizer").glob("*token*"):
            shutil.copy(f, tmp_path / "src")
        small_hf = SimpleNamespace(path=tmp_path / "src")
        options = []
    assert hammer(small_hf.path, tmp_path / "hf", "--to", "hf", *options) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (
        hammerllm_dir / "tokenizer" / "tokenizer.model").read_bytes()
    ours = Tokenizer.from_pretrained(hammerllm_dir / "tokenizer")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["你好 world", "def f(x):\n    return x  # 注释 12345", "  two spaces (then) 龘 😀"]:
        assert theirs(text)["input_ids"] == ours.encode(text), text


def break_checkpoint(src, dst, *, config=(), tensors=(), drop_config=False):
    """A copy of HF directory `src` with config.json keys and tensors set (None: removed)."""
    dst.mkdir()
    hf_config = json.loads((src / "config.json").read_text())
    weights = convert.load_hf(src)[1]
    for changes, target in [(dict(config), hf_config), (dict(tensors), weights)]:
        for key, value in changes.items():
            target[key] = value
            if value is None:
                del target[key]
    if not drop_config:
        (dst / "config.json").write_text(json.dumps(hf_config))
    save_file(weights, dst / "model.safetensors")


BAD_INPUTS = {
    "missing config.json": (dict(drop_config=True), "no config.json at"),
    "wrong shape": (dict(tensors={"model.layers.1.mlp.up_proj.weight": np.zeros((56, 92), np.float32)}),
                    "model.layers.1.mlp.up_proj.weight has shape (56, 92), expected (92, 56)"),
    "missing tensor": (dict(tensors={"model.layers.0.self_attn.k_proj.weight": None}),
                       "missing HF tensor model.layers.0.self_attn.k_proj.weight"),
    "unexpected tensor": (dict(tensors={"model.layers.0.self_attn.q_norm.weight": np.ones(14, np.float32)}),
                          "unexpected HF tensor model.layers.0.self_attn.q_norm.weight"),
    "unknown architecture": (dict(config={"architectures": ["MistralForCausalLM"]}), "architectures"),
    "vocab_size disagrees": (dict(config={"vocab_size": 1000}),
                             "vocab_size 1000 disagrees with model.embed_tokens.weight"),
}


@pytest.mark.parametrize("to", ["jax", "hf"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_it_with_nonzero_exit_and_no_output(small_hf, tmp_path,
                                                                         capsys, case, to):
    changes, message = BAD_INPUTS[case]
    break_checkpoint(small_hf.path, tmp_path / "src", **changes)
    capsys.readouterr()
    assert hammer(tmp_path / "src", tmp_path / "out" / "dst", "--to", to) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out" / "dst").exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def _truncated(src, dst):
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    with open(dst / "model.safetensors", "r+b") as f:
        f.truncate(1000)


def _trainer_checkpoint(src, dst):
    state = {k: torch.from_numpy(v) for k, v in convert.load_hf(src)[1].items()}
    torch.save({"model": state, "step": 3}, dst / "pytorch_model.bin")


def _pickled_numpy(src, dst):
    torch.save(convert.load_hf(src)[1], dst / "pytorch_model.bin")


def _bad_index(src, dst):
    shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    (dst / "model.safetensors.index.json").write_text('{"weight_map": ')


UNREADABLE = {
    "truncated safetensors": (_truncated, "model.safetensors is not a readable safetensors file"),
    "empty pytorch_model.bin": (lambda src, dst: (dst / "pytorch_model.bin").write_bytes(b""),
                                "pytorch_model.bin is not a readable torch state dict"),
    "trainer checkpoint": (_trainer_checkpoint, "entry 'model' is a dict, expected a tensor"),
    "numpy arrays pickled": (_pickled_numpy, "hammer refuses to unpickle (weights_only=True)"),
    "index not JSON": (_bad_index, "model.safetensors.index.json is not a JSON object"),
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_weight_files_are_one_line_errors_naming_the_file(small_hf, tmp_path, capsys, case):
    write, message = UNREADABLE[case]
    copy_config(small_hf.path, tmp_path / "src")
    write(small_hf.path, tmp_path / "src")
    capsys.readouterr()
    assert hammer(tmp_path / "src", tmp_path / "dst", "--to", "jax") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "dst").exists()


def test_an_existing_destination_is_never_overwritten(small_hf, tmp_path, capsys):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "mine.txt").write_text("keep")
    assert hammer(small_hf.path, tmp_path / "dst", "--to", "hf") == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["mine.txt"]


def test_a_saved_tied_head_is_dropped_only_when_it_is_the_embedding(small_hf):
    config, tensors = convert.load_hf(small_hf.path)
    embedding = tensors["model.embed_tokens.weight"]
    kept = convert.check_hf({**tensors, "lm_head.weight": embedding.copy()}, config)
    assert sorted(kept) == sorted(tensors)
    with pytest.raises(convert.ConvertError, match="lm_head.weight differs"):
        convert.check_hf({**tensors, "lm_head.weight": embedding + 1}, config)


def test_jax_params_with_a_wrong_shape_or_a_missing_entry_are_refused_naming_the_path(small_hf):
    config = convert.load_hf(small_hf.path)[0]
    params = random_params(config, np.float32, scan_layers=False)
    # [in, out], the transposed layout, is refused: kernels are [out, in] = [mlp, embed] here.
    params["layers"][1]["mlp"]["up_proj"]["kernel"] = np.zeros((56, 92), np.float32)
    with pytest.raises(convert.ConvertError, match=r"layers\.1\.mlp\.up_proj\.kernel has shape "
                                                   r"\(56, 92\), expected \(92, 56\)"):
        convert.jax_to_hf(params, config)
    del params["layers"][0]["self_attn"]["k_proj"]
    with pytest.raises(convert.ConvertError, match=r"missing JAX tensor layers\.0\.self_attn\.k_proj"):
        convert.jax_to_hf(params, config)
    stacked = random_params(config, np.float32, scan_layers=True)
    stacked["layers"]["mlp"]["gate_proj"]["kernel"] = stacked["layers"]["mlp"]["gate_proj"]["kernel"][:1]
    with pytest.raises(convert.ConvertError, match=r"stacked JAX tensor layers\.mlp\.gate_proj\.kernel "
                                                   r"has shape \(1, 92, 56\), expected a leading axis of "
                                                   r"num_layers=2"):
        convert.jax_to_hf(stacked, config)


def test_a_torch_training_run_directory_reads_as_its_newest_checkpoint(tmp_path):
    from hammer.config import ModelConfig

    config = ModelConfig(vocab_size=67, hidden_size=16, intermediate_size=24, num_layers=1,
                         num_heads=2, num_kv_heads=1)
    run = tmp_path / "run"
    for step, seed in ((3, 0), (10, 1)):
        convert.save_hf(run / "checkpoints" / f"step_{step}", config, random_hf_tensors(config, std=0.02, seed=seed))
    _, newest = convert.read_checkpoint(run)
    _, step10 = convert.read_checkpoint(run / "checkpoints" / "step_10")
    assert newest.keys() == step10.keys()
    assert all(np.array_equal(newest[k], step10[k]) for k in newest)
