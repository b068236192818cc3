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
    given, the parameter dtype; other options (attention_impl, scan_layers, vocab_multiple) go
    to `Llama`."""
    config, params = convert.read_jax_params(path, model_options.get("scan_layers", False))
    model_options.setdefault("param_dtype", dtype)
    return model_from_params(config, params, dtype=dtype, **model_options)


def model_from_params(config: ModelConfig, params: Mapping[str, Any], **model_options) -> Llama:
    """A Llama holding `params` (nested dict in its own layout), built without a random init.
    Their vocabulary may have another padding (a run trained on another mesh): it is re-padded
    to the model's."""
    abstract = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), **model_options))
    graphdef, state = nnx.split(abstract)
    params = convert.fit_vocab(params, config, abstract.vocab_rows)
    _check_shapes(nnx.to_pure_dict(state), params)
    param_dtype = model_options.get("param_dtype", jnp.float32)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params))
    return nnx.merge(graphdef, state)


def _check_shapes(expected: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """Every parameter present, none extra, each of the model's shape: nnx itself would take a
    wrong shape silently and fail far away on a missing one."""
    def shapes(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {".".join(str(k.key) for k in path): tuple(x.shape) for path, x in leaves}

    want, got = shapes(expected), shapes(params)
    for name in sorted(want.keys() | got.keys()):
        if name not in got:
            raise convert.ConvertError(f"missing JAX parameter {name}")
        if name not in want:
            raise convert.ConvertError(f"unexpected JAX parameter {name}")
        if got[name] != want[name]:
            raise convert.ConvertError(f"JAX parameter {name} has shape {got[name]}, "
                                       f"expected {want[name]}")


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
