"""hammer's JAX format: config.json beside an orbax checkpoint of the param tree in `params/`.

The tree is hammer_jax's `nnx.state(model, nnx.Param).to_pure_dict()`, per-layer or stacked
(scan_layers); readers accept either. orbax is imported only here, when a JAX directory is used.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from convert.hf import to_dtype, write_generation_config
from convert.mapping import ConvertError, map_leaves
from hammer.config import ModelConfig
from hammer.fsio import atomic_directory

PARAMS_DIR = "params"


def is_jax_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / PARAMS_DIR).is_dir()


def save_jax(dst: str | os.PathLike, config: ModelConfig, params: Mapping[str, Any], *,
             tokenizer: Any = None, dtype: str | None = None,
             generation_config: Mapping[str, Any] | None = None) -> Path:
    """Writes config.json, the orbax checkpoint of `params` and, given them, the tokenizer and
    the generation_config.json to carry into a later HF export."""
    import orbax.checkpoint as ocp

    if dtype is not None:
        params = map_leaves(lambda x: to_dtype(x, dtype), params)
    with atomic_directory(dst) as tmp:
        config.save(tmp, dtype=dtype)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save((tmp / PARAMS_DIR).absolute(), params)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if generation_config is not None:
            write_generation_config(tmp, generation_config)
    return Path(dst)


def load_jax(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, param tree of numpy arrays) from a directory `save_jax` wrote."""
    import orbax.checkpoint as ocp

    path = Path(path)
    config = ModelConfig.from_hf(path)
    if not is_jax_dir(path):
        raise FileNotFoundError(f"no orbax checkpoint at {path / PARAMS_DIR}")
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore((path / PARAMS_DIR).absolute())
    if not isinstance(params, Mapping):
        raise ConvertError(f"{path / PARAMS_DIR} holds a {type(params).__name__}, not a param tree")
    return config, map_leaves(np.asarray, params)


