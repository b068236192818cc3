"""An HF export says what its tokenizer does in the keys llama.cpp's converter (`convert_hf_to_gguf.py`)
reads, so that llama.cpp encodes prompts into the ids the model was trained on: checked against the
SentencePiece model itself for HammerLLM's tokenizer (no dummy prefix) and trained ones (with and
without), through `gguf.SpecialVocab`, the converter's own reader of the special tokens."""
import json
import logging

import pytest
from sentencepiece import sentencepiece_model_pb2

import convert
from hammer.config import ModelConfig
from hammer.tokenizer import Tokenizer
from tests.eval_fixtures import random_hf_tensors
from tests.tokenizer_fixtures import train_tiny_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


TRAINED = ["trained", "trained-dummy-prefix"]


def tokenizer_named(name, hammerllm_dir) -> Tokenizer:
    if name == "hammerllm":
        return Tokenizer.from_pretrained(hammerllm_dir / "tokenizer")
    return Tokenizer(train_tiny_model(add_dummy_prefix=name.endswith("dummy-prefix")))


@pytest.fixture(scope="module", params=["hammerllm", *TRAINED])
def exported(request, tmp_path_factory):
    """(tokenizer, what `hammer convert ... --to hf` writes for a one-layer model of its vocabulary)."""
    if request.param == "hammerllm":
        hammerllm_dir = request.getfixturevalue("hammerllm_dir")
    else:
        hammerllm_dir = None
    tokenizer = tokenizer_named(request.param, hammerllm_dir)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=24, num_layers=1,
                         num_heads=2, num_kv_heads=1, rope_theta=500000.0)
    directory = tmp_path_factory.mktemp(request.param) / "hf"
    convert.save_hf(directory, config, random_hf_tensors(config, std=0.02), tokenizer=tokenizer)
    return tokenizer, directory


def test_add_prefix_space_is_the_sentencepiece_models_add_dummy_prefix(exported):
    _, hf = exported
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString((hf / "tokenizer.model").read_bytes())
    config = json.loads((hf / "tokenizer_config.json").read_text())
    assert config["add_prefix_space"] is model.normalizer_spec.add_dummy_prefix


def test_added_tokens_give_llama_cpp_the_control_and_user_defined_pieces(exported):
    """The converter types pieces by tokenizer.model's Is* checks, which know no user-defined
    pieces, then by added_tokens_decoder (special: control, else user-defined)."""
    tokenizer, hf = exported
    config = json.loads((hf / "tokenizer_config.json").read_text())
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    expected = {str(i): (p.piece, p.type == kinds.CONTROL) for i, p in enumerate(tokenizer.proto.pieces)
                if p.type in (kinds.CONTROL, kinds.USER_DEFINED)}
    assert {i: (t["content"], t["special"]) for i, t in config["added_tokens_decoder"].items()} == expected


def test_llama_cpp_reads_the_special_tokens_without_a_warning(exported, caplog):
    tokenizer, hf = exported
    with caplog.at_level(logging.WARNING):
        special = gguf.SpecialVocab(hf, n_vocab=tokenizer.vocab_size)
    assert caplog.records == []  # no `Unknown separator token '<s>' in TemplateProcessing<pair>`
    assert special.special_token_ids == {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id,
                                         "unk": tokenizer.unk_id}
    assert special.add_special_token["bos"] is True and special.add_special_token["eos"] is False
    assert not special.add_special_token.get("sep")


@pytest.mark.parametrize("name", TRAINED)  # the template is the same for every tokenizer
def test_a_pair_of_texts_is_one_sequence_with_one_bos(name, tmp_path):
    tokenizer = tokenizer_named(name, None)
    tokenizer.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    first, second = "天地玄黄 the quick", " brown fox 123"
    assert hf(first, second)["input_ids"] == tokenizer.encode(first) + tokenizer.encode(second, False)


def test_config_rope_is_plain_rope_for_llama_cpp_and_transformers(exported):
    _, hf = exported
    config = json.loads((hf / "config.json").read_text())
    # The converter warns `Unknown RoPE type` for any rope_type it has no scaling for, "default" too.
    rope = config.get("rope_parameters", config.get("rope_scaling")) or {}
    assert rope.get("rope_type", rope.get("type")) is None
    assert config["rope_theta"] == 500000.0
    assert transformers.AutoConfig.from_pretrained(hf).rope_parameters == {"rope_type": "default",
                                                                           "rope_theta": 500000.0}


# gguf's reader takes seconds over HammerLLM's 105789 pieces; the trained tokenizers cover both cases.
@pytest.mark.parametrize("exported", TRAINED, indirect=True)
def test_the_gguf_file_adds_the_leading_space_exactly_when_sentencepiece_does(exported, tmp_path):
    tokenizer, hf = exported
    convert.save_gguf(tmp_path / "m.gguf", *convert.open_checkpoint(hf), tokenizer=tokenizer)
    field = gguf.GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.add_space_prefix"]
    assert field.contents() is tokenizer.add_dummy_prefix
