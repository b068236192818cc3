"""Models from and to checkpoints on disk (HF directories or hammer's orbax format)."""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

import convert
from hammer.config import ModelConfig
from hammer_jax.model import Llama


def from_pretrained(path: str | os.PathLike, dtype=jnp.float32, **model_options) -> Llama:
    """A Llama from an HF directory (config.json + safetensors/bin) or a hammer JAX directory
    (orbax + config.json), detected. `dtype` is the compute dtype and, unless `param_dtype` is
    given, the parameter dtype; other options (attention_impl, scan_layers) go to `Llama`."""
    config, tensors = convert.read_checkpoint(path)
    params = convert.hf_to_jax(tensors, config, model_options.get("scan_layers", False))
    model_options.setdefault("param_dtype", dtype)
    return model_from_params(config, params, dtype=dtype, **model_options)


def model_from_params(config: ModelConfig, params: Mapping[str, Any], **model_options) -> Llama:
    """A Llama holding `params` (nested dict in its own layout), built without a random init."""
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), **model_options))
    graphdef, state = nnx.split(abstract)
    param_dtype = model_options.get("param_dtype", jnp.float32)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params))
    return nnx.merge(graphdef, state)


def params_of(model: Llama) -> dict[str, Any]:
    """The model's parameters as the nested dict `convert` reads."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def save_pretrained(model: Llama, dst: str | os.PathLike, *, to: str = "jax", tokenizer=None,
                    dtype: str | None = None) -> None:
    """Writes `model` as a hammer JAX directory (to="jax") or an HF directory (to="hf")."""
    params = params_of(model)
    if to == "jax":
        convert.save_jax(dst, model.config, params, tokenizer=tokenizer, dtype=dtype)
    elif to == "hf":
        convert.save_hf(dst, model.config, convert.jax_to_hf(params, model.config),
                        tokenizer=tokenizer, dtype=dtype)
    else:
        raise ValueError(f"to={to!r}: expected 'jax' or 'hf'")
