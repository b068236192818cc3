import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hammer_torch  # noqa: E402
from hammer.cli import main as hammer_main  # noqa: E402
from hammer_torch.checkpoint import save_pretrained  # noqa: E402
from tests.test_torch_model import hf_model, ids, make_config  # noqa: E402


def logits_of(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("layout", ["safetensors", "sharded_safetensors", "pytorch_model_bin",
                                    "compiled_prefixes"])
def test_from_pretrained_reads_every_hf_layout_to_the_same_logits(tmp_path, layout):
    config = make_config()
    hf = hf_model(config)
    if layout == "safetensors":
        hf.save_pretrained(tmp_path)
    elif layout == "sharded_safetensors":
        hf.save_pretrained(tmp_path, max_shard_size="300KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        prefix = "_orig_mod." if layout == "compiled_prefixes" else ""
        config.save(tmp_path)
        torch.save({prefix + k: v for k, v in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    twin = hammer_torch.from_pretrained(tmp_path, attn_impl="sdpa")
    x = ids(config)
    assert (logits_of(twin, x) - logits_of(hf, x)).abs().max() <= 1e-5


def test_from_pretrained_of_a_tied_checkpoint_in_bfloat16_keeps_the_head_tied(tmp_path):
    config = make_config(tie_word_embeddings=True)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path)
    twin = hammer_torch.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_impl="eager")
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    assert {p.dtype for p in twin.parameters()} == {torch.bfloat16}
    x = ids(config)
    expected = logits_of(hf, x)
    theirs = (logits_of(hf.to(torch.bfloat16), x).float() - expected).abs().max()
    # No worse than transformers' own bfloat16 run (1.5x for which roundings line up, as convert's test).
    assert (logits_of(twin, x).float() - expected).abs().max() <= 1.5 * theirs


@pytest.mark.slow
def test_from_pretrained_with_compile_runs_compiled_blocks_that_give_the_eager_logits(tmp_path):
    from torch._dynamo.utils import counters

    config = make_config(num_layers=1, vocab_size=211)  # small: inductor compiles C++ on CPU
    hf_model(config).save_pretrained(tmp_path)
    eager = hammer_torch.from_pretrained(tmp_path, attn_impl="sdpa")
    torch._dynamo.reset()
    counters.clear()
    twin = hammer_torch.from_pretrained(tmp_path, attn_impl="sdpa", compile=True)
    x = ids(config, seq=13)
    got = logits_of(twin, x)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo traced and compiled the block
    assert (got - logits_of(eager, x)).abs().max() <= 1e-5
    assert got.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert set(twin.state_dict()) == set(hf_model(config).state_dict())  # no `_orig_mod.` keys


def test_saved_twin_loads_in_transformers_and_back_unchanged(tmp_path):
    config = make_config(tie_word_embeddings=True)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path / "hf")
    twin = hammer_torch.from_pretrained(tmp_path / "hf", attn_impl="sdpa")
    save_pretrained(twin, tmp_path / "twin")
    again = hammer_torch.from_pretrained(tmp_path / "twin", attn_impl="sdpa")
    for (name, a), b in zip(twin.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "twin").eval()
    x = ids(config)
    assert (logits_of(reloaded, x) - logits_of(twin, x)).abs().max() <= 1e-5


def test_saving_over_an_existing_directory_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        save_pretrained(hammer_torch.Llama(make_config()), tmp_path / "out")


@pytest.mark.parametrize("tied", [False, True])
def test_the_twins_state_dict_is_convert_tables_names_and_shapes(tied):
    """Why `hammer convert --to torch` writes an HF directory without importing torch."""
    import convert

    config = make_config(tie_word_embeddings=tied, num_kv_heads=1, head_dim=14)
    with torch.device("meta"):
        state = hammer_torch.Llama(config).state_dict()
    if tied:
        del state["lm_head.weight"]  # HF leaves a tied head out
    assert {n: tuple(p.shape) for n, p in state.items()} == {t.hf: t.hf_shape for t in convert.tensors(config)}


def test_hammer_convert_to_torch_writes_the_twins_state_dict_in_bfloat16(tmp_path):
    config = make_config(num_kv_heads=1, head_dim=14)
    hf = hf_model(config)
    hf.save_pretrained(tmp_path / "hf")
    assert hammer_main(["convert", str(tmp_path / "hf"), str(tmp_path / "torch"), "--to", "torch",
                        "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "torch" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    twin = hammer_torch.from_pretrained(tmp_path / "torch", dtype=torch.bfloat16)
    for name, p in hf.state_dict().items():
        assert torch.equal(twin.state_dict()[name], p.to(torch.bfloat16)), name
    # An existing output is refused before anything is read or written.
    assert hammer_main(["convert", str(tmp_path / "hf"), str(tmp_path / "torch"), "--to", "torch"]) == 2


def test_a_hammer_jax_checkpoint_converts_to_the_twin_through_the_one_table(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    import convert

    config = make_config(tie_word_embeddings=True)
    hf_state = hf_model(config).state_dict()
    tensors = {k: v.numpy() for k, v in hf_state.items() if k != "lm_head.weight"}
    convert.save_jax(tmp_path / "jax", config, convert.hf_to_jax(tensors, config))
    assert hammer_main(["convert", str(tmp_path / "jax"), str(tmp_path / "torch"), "--to", "torch"]) == 0
    for path in (tmp_path / "jax", tmp_path / "torch"):  # either directory loads as the twin
        twin = hammer_torch.from_pretrained(path)
        for name, p in hf_state.items():
            assert torch.equal(twin.state_dict()[name], p), (path.name, name)
