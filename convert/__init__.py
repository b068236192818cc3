"""Checkpoint conversion between HuggingFace Llama directories, hammer_jax and (via HF names)
torch state dicts. Pure functions over name -> numpy array maps; bfloat16 is ml_dtypes.bfloat16.

    load_hf(path) -> (ModelConfig, {hf_name: array})        HF dir: safetensors (one or sharded
                                                             with index) or pytorch_model.bin;
                                                             `_orig_mod.`/`module.` stripped
    save_hf(dst, config, tensors, tokenizer=None, dtype=None, generation_config=None,
            max_shard_bytes=5 GiB)
    check_hf(tensors, config) -> {hf_name: array}            exactly the config's tensors, checked
    hf_to_jax(tensors, config, scan_layers=False) -> params  nested dict, nnx pure-dict layout
    jax_to_hf(params, config) -> {hf_name: array}            per-layer or stacked params
    layer_layout(params, config, stacked) -> params          per-layer <-> stacked, checked
    load_jax(path) -> (ModelConfig, params)                  orbax checkpoint + config.json, or a
                                                             JAX training run / checkpoint step
    locate_jax(path) -> (config dir, params dir)
    save_jax(dst, config, params, tokenizer=None, dtype=None, generation_config=None)
    read_generation_config(path) -> dict | None              a directory's generation_config.json
    read_checkpoint(path) -> (ModelConfig, {hf_name: array}) either format, detected
    read_jax_params(path, scan_layers=False) -> (ModelConfig, params)   either format, detected

Every writer fills a temporary directory renamed into place at the end (hammer.fsio), so a
failure leaves no DST. Bad input raises ConvertError (a ValueError) naming the tensor or field.
"""
from convert.hf import (TokenizerFiles, is_hf_dir, load_hf, read_generation_config, save_hf,
                        strip_wrapper_prefixes)
from convert.jax_checkpoint import is_jax_dir, load_jax, locate_jax, save_jax
from convert.mapping import (TABLE, ConvertError, check_hf, hf_to_jax, jax_to_hf, layer_layout,
                             tensors)


def read_checkpoint(path) -> tuple:
    """(config, HF-named tensors) from an HF or a hammer JAX directory."""
    if is_jax_dir(path):
        config, params = load_jax(path)
        return config, jax_to_hf(params, config)
    return load_hf(path)


def read_jax_params(path, scan_layers: bool = False) -> tuple:
    """(config, hammer_jax params) from an HF or a hammer JAX directory. A JAX directory's tree
    is already hammer_jax's layout: only its layers are (un)stacked, no detour through HF names."""
    if is_jax_dir(path):
        config, params = load_jax(path)
        return config, layer_layout(params, config, scan_layers)
    config, tensors = load_hf(path)
    return config, hf_to_jax(tensors, config, scan_layers)


__all__ = ["TABLE", "ConvertError", "TokenizerFiles", "check_hf", "hf_to_jax", "is_hf_dir",
           "is_jax_dir", "jax_to_hf", "layer_layout", "load_hf", "load_jax", "locate_jax", "read_checkpoint",
           "read_generation_config", "read_jax_params", "save_hf", "save_jax",
           "strip_wrapper_prefixes", "tensors"]
