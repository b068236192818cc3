import json

import pytest

from hammer.config import ConfigError, ModelConfig
from tests.conftest import REPO

BASE = dict(vocab_size=1013, hidden_size=64, intermediate_size=172, num_layers=2,
            num_heads=8, num_kv_heads=2)


def test_hammerllm_preset_has_1_402_288_128_parameters_as_hf_counts_them():
    config = ModelConfig.from_hf(REPO / "configs" / "hammerllm-1.4b.json")
    assert config.param_count() == 1_402_288_128
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (22, 2048, 5632)
    assert (config.num_heads, config.num_kv_heads, config.vocab_size) == (32, 4, 105789)


def test_preset_equals_hammerllm_released_config(hammerllm_dir):
    assert (ModelConfig.from_hf(REPO / "configs" / "hammerllm-1.4b.json")
            == ModelConfig.from_hf(hammerllm_dir / "tokenizer" / "config.json"))


def test_param_count_matches_transformers():
    transformers = pytest.importorskip("transformers")
    for tied in (False, True):
        config = ModelConfig(**BASE, tie_word_embeddings=tied)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf()))
        assert config.param_count() == model.num_parameters()


def test_to_hf_round_trips_and_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = ModelConfig(**BASE, rope_theta=500000.0, tie_word_embeddings=True)
    config.save(tmp_path)
    assert ModelConfig.from_hf(tmp_path) == config
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.num_key_value_heads == 2 and hf.tie_word_embeddings
    assert hf.rope_parameters["rope_theta"] == 500000.0


@pytest.mark.parametrize("rope_keys, theta", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, 500000.0),  # transformers 5
    ({"rope_theta": 250000.0, "rope_scaling": None}, 250000.0),  # transformers 4
    ({}, 10000.0),  # HammerLLM's own config.json names neither
])
def test_rope_theta_is_read_from_every_config_generation(rope_keys, theta):
    hf = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, **rope_keys}
    assert ModelConfig.from_hf(hf).rope_theta == theta


def test_head_dim_defaults_to_hidden_over_heads_and_kv_heads_to_heads():
    config = ModelConfig.from_hf({"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
                                  "num_hidden_layers": 2, "num_attention_heads": 4})
    assert (config.head_dim, config.num_kv_heads) == (16, 4)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": 65}, "hidden_size 65 is not divisible by num_heads 8"),
    ({"num_kv_heads": 3}, "num_heads 8 is not divisible by num_kv_heads 3"),
    ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
    ({"eos_token_id": 5000}, "eos_token_id 5000 is outside the vocabulary"),
])
def test_invalid_values_are_refused_naming_field_and_value(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**BASE, **change})


@pytest.mark.parametrize("extra, message", [
    ({"architectures": ["MistralForCausalLM"]}, "architectures is \\['MistralForCausalLM'\\]"),
    ({"model_type": "gpt2"}, "model_type is 'gpt2'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling 'linear' is not supported"),
    ({"attention_bias": True}, "attention_bias is True"),
    ({"num_key_value_heads": 0}, "num_kv_heads must be a positive integer, got 0"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a number, got '1e-5'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": None}}, "rope_theta must be a number"),
    ({"eos_token_id": [2, 7]}, "^config: eos_token_id \\[2, 7\\] lists several ids"),
])
def test_unsupported_hf_configs_are_refused(extra, message):
    hf = {**ModelConfig(**BASE).to_hf(), **extra}
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(hf)


def test_missing_config_json_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match=f"no config.json at {tmp_path}"):
        ModelConfig.from_hf(tmp_path)


def test_tiny_preset_is_read_as_transformers_reads_it():
    transformers = pytest.importorskip("transformers")
    path = REPO / "configs" / "tiny.json"
    config = ModelConfig.from_hf(json.loads(path.read_text()))
    hf = transformers.LlamaConfig.from_json_file(path)
    assert (config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size) == \
        (hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, hf.vocab_size)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.rms_norm_eps) == \
        (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.rms_norm_eps)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert config.param_count() == transformers.LlamaForCausalLM(hf).num_parameters()
    assert ModelConfig.from_hf(config.to_hf()) == config


def test_replace_rederives_head_dim_and_flops_per_token_counts_6n_plus_attention():
    config = ModelConfig.from_hf(REPO / "configs" / "hammerllm-1.4b.json")
    assert config.replace(num_heads=16).head_dim == 128
    assert config.replace(hidden_size=1024, head_dim=80).head_dim == 80
    assert config.param_count(embeddings=False) == 1_402_288_128 - 105789 * 2048  # the head stays
    # 6 x 1,185,632,256 non-embedding parameters + 12 x 22 layers x 2048 x 2048 tokens of attention
    assert config.flops_per_token(2048) == 8_221_089_792
