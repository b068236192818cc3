"""Checkpoint conversion between HuggingFace Llama directories, hammer_jax and (via HF names)
torch state dicts. Pure functions over name -> numpy array maps; bfloat16 is ml_dtypes.bfloat16.
The open_* and *_as_* functions give LazyTensors instead (shape and dtype now, `np.asarray` reads
or transforms), which every function here takes as arrays: a conversion streams through them.

    load_hf(path) -> (ModelConfig, {hf_name: array})        HF dir: safetensors (one or sharded
                                                             with index) or pytorch_model.bin;
                                                             `_orig_mod.`/`module.` stripped
    open_hf(path) -> (ModelConfig, {hf_name: LazyTensor})   each read from disk when used
    save_hf(dst, config, tensors, tokenizer=None, dtype=None, generation_config=None,
            max_shard_bytes=5 GiB)
    check_hf(tensors, config) -> {hf_name: array}            exactly the config's tensors, checked
    hf_to_jax(tensors, config, scan_layers=False) -> params  nested dict, nnx pure-dict layout,
                                                             vocabulary padded (VOCAB_MULTIPLE)
    fit_vocab(params, config, vocab_rows) -> params          the vocabulary re-padded
    jax_to_hf(params, config) -> {hf_name: array}            per-layer or stacked params
    jax_as_hf(params, config) -> {hf_name: LazyTensor}       each made when used
    layer_layout(params, config, stacked) -> params          per-layer <-> stacked, checked
    load_jax(path) -> (ModelConfig, params)                  orbax checkpoint + config.json, or a
                                                             JAX training run / checkpoint step
    locate_jax(path) -> (config dir, params dir)
    model_dir(path) -> Path                                  where a model path's config.json and
                                                             tokenizer lie (a run or any step)
    run_vocab_rows(run_dir) -> int | None                    the embedding rows a training run's
                                                             checkpoints hold
    save_jax(dst, config, params, tokenizer=None, dtype=None, generation_config=None)
    read_generation_config(path) -> dict | None              a directory's generation_config.json
    read_checkpoint(path) -> (ModelConfig, {hf_name: array}) either format, detected
    open_checkpoint(path) -> (ModelConfig, {hf_name: LazyTensor})   either format, detected
    read_jax_params(path, scan_layers=False) -> (ModelConfig, params)   either format, detected
    model_dir(path) -> Path                                  where a checkpoint's config.json and
                                                             tokenizer lie (a run's own directory
                                                             for JAX, its newest step for torch)
    save_gguf(dst, config, tensors, tokenizer, dtype=None)  one GGUF file for llama.cpp (the `gguf`
                                                             package): q/k rows in its RoPE order,
                                                             f32/f16/bf16/q8_0

Every writer fills a temporary directory (GGUF: file) renamed into place at the end (hammer.fsio), so a
failure leaves no DST. Bad input raises ConvertError (a ValueError) naming the tensor or field.
"""
from pathlib import Path

import numpy as np

from convert.gguf_file import save_gguf
from convert.hf import (TokenizerFiles, is_hf_dir, load_hf, newest_torch_checkpoint, open_hf,
                        read_generation_config, save_hf, strip_wrapper_prefixes)
from convert.jax_checkpoint import is_jax_dir, load_jax, locate_jax, run_vocab_rows, save_jax
from convert.lazy import LazyTensor
from convert.mapping import (TABLE, VOCAB_MULTIPLE, ConvertError, check_hf, fit_vocab, hf_to_jax,
                             jax_as_hf, jax_to_hf, layer_layout, padded_vocab_size, tensors)


def read_checkpoint(path) -> tuple:
    """(config, HF-named tensors) from an HF or a hammer JAX directory."""
    config, tensors = open_checkpoint(path)
    return config, {name: np.asarray(x) for name, x in tensors.items()}


def open_checkpoint(path) -> tuple:
    """(config, HF-named LazyTensors) from an HF or a hammer JAX directory: an HF tensor is read
    from disk when used; a JAX directory's tree is read whole and each HF tensor made when used."""
    if is_jax_dir(path):
        config, params = load_jax(path)
        return config, jax_as_hf(params, config)
    return open_hf(path)


def model_dir(path) -> Path:
    """The directory holding config.json, the tokenizer and generation_config.json of the model at
    `path`: a JAX training run's directory for the run or any of its steps (a step holds only
    params), a torch run's newest step (each step is a whole HF directory), else `path`."""
    if is_jax_dir(path):
        return locate_jax(path)[0]
    return newest_torch_checkpoint(Path(path))


def read_jax_params(path, scan_layers: bool = False) -> tuple:
    """(config, hammer_jax params) from an HF or a hammer JAX directory. A JAX directory's tree
    is already hammer_jax's layout: only its layers are (un)stacked, no detour through HF names."""
    if is_jax_dir(path):
        config, params = load_jax(path)
        return config, layer_layout(params, config, scan_layers)
    config, tensors = open_hf(path)
    return config, hf_to_jax(tensors, config, scan_layers)


__all__ = ["TABLE", "VOCAB_MULTIPLE", "ConvertError", "LazyTensor", "TokenizerFiles", "check_hf",
           "fit_vocab", "hf_to_jax", "padded_vocab_size",
           "is_hf_dir", "is_jax_dir", "jax_as_hf", "jax_to_hf", "layer_layout", "load_hf", "load_jax",
           "locate_jax", "model_dir", "open_checkpoint", "open_hf", "read_checkpoint",
           "read_generation_config", "read_jax_params", "run_vocab_rows", "save_gguf", "save_hf", "save_jax",
           "strip_wrapper_prefixes", "tensors"]
