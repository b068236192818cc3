"""hammer's JAX format: config.json beside an orbax checkpoint of the param tree in `params/`.

The tree is hammer_jax's `nnx.state(model, nnx.Param).to_pure_dict()`, per-layer or stacked
(scan_layers); readers accept either. orbax is imported only here, when a JAX directory is used.
The JAX trainer's checkpoints read the same way: a step directory RUN/checkpoints/<step> holds
`params/` and takes config.json from its run directory RUN; RUN itself means its newest step.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from convert.hf import dtype_label, to_dtype, write_generation_config
from convert.mapping import ConvertError, _flatten, _set, leaves, map_leaves
from hammer.config import ModelConfig
from hammer.fsio import atomic_directory
from hammer.run import CHECKPOINTS_DIR

PARAMS_DIR = "params"
RESTORE_GROUP_BYTES = 512 * 2**20


def is_jax_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / PARAMS_DIR).is_dir() or _training_checkpoint(Path(path)) is not None


def locate_jax(path: str | os.PathLike) -> tuple[Path, Path]:
    """(directory holding config.json, params directory) of a hammer JAX directory or a JAX
    training checkpoint (a run directory or one of its steps)."""
    path = Path(path)
    found = _training_checkpoint(path)
    if found is not None:
        return found
    return path, path / PARAMS_DIR


def _training_checkpoint(path: Path) -> tuple[Path, Path] | None:
    if (path / CHECKPOINTS_DIR).is_dir() and (path / "config.json").is_file():
        steps = [int(p.name) for p in (path / CHECKPOINTS_DIR).iterdir()
                 if p.name.isdigit() and (p / PARAMS_DIR).is_dir()]
        return (path, path / CHECKPOINTS_DIR / str(max(steps)) / PARAMS_DIR) if steps else None
    run = path.parent.parent
    if ((path / PARAMS_DIR).is_dir() and path.parent.name == CHECKPOINTS_DIR
            and not (path / "config.json").is_file() and (run / "config.json").is_file()):
        return run, path / PARAMS_DIR
    return None


def save_jax(dst: str | os.PathLike, config: ModelConfig, params: Mapping[str, Any], *,
             tokenizer: Any = None, dtype: str | None = None,
             generation_config: Mapping[str, Any] | None = None) -> Path:
    """Writes config.json (torch_dtype: the params' one dtype), the orbax checkpoint of `params`
    (numpy or jax arrays) and, given them, the tokenizer and the generation_config.json to carry
    into a later HF export."""
    import orbax.checkpoint as ocp

    if dtype is not None:
        params = map_leaves(lambda x: to_dtype(x, dtype), params)
    with atomic_directory(dst) as tmp:
        config.save(tmp, dtype=dtype_label(leaves(params)))
        with _checkpointer() as checkpointer:
            checkpointer.save((tmp / PARAMS_DIR).absolute(), args=ocp.args.PyTreeSave(params))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if generation_config is not None:
            write_generation_config(tmp, generation_config)
    return Path(dst)


def load_jax(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, param tree of numpy arrays) from a directory `save_jax` wrote."""
    import orbax.checkpoint as ocp

    config_dir, params_dir = locate_jax(path)
    config = ModelConfig.from_hf(config_dir)
    if not params_dir.is_dir():
        raise FileNotFoundError(f"no orbax checkpoint at {params_dir}")
    with _checkpointer() as checkpointer:
        saved = _saved_tree(checkpointer, params_dir)
        params: dict[str, Any] = {}
        for group in _groups(saved, RESTORE_GROUP_BYTES):
            # Every leaf as numpy, however it was saved (a trainer saves jax.Arrays): straight
            # from the file into host memory, never through a jax.Array on a device.
            as_numpy = map_leaves(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), group)
            restored = checkpointer.restore(params_dir.absolute(), args=ocp.args.PyTreeRestore(
                item=group, restore_args=as_numpy, partial_restore=True))
            for path, x in _flatten(restored):
                _set(params, path, x)
    return config, params


def _saved_tree(checkpointer, params_dir: Path) -> Mapping[str, Any]:
    """The saved param tree's array metadata (shapes, dtypes), nothing read."""
    metadata = checkpointer.metadata(params_dir.absolute()).item_metadata
    saved = None if metadata is None else metadata.tree
    if not isinstance(saved, Mapping):
        raise ConvertError(f"{params_dir} holds no param tree that orbax can read")
    return saved


def saved_shapes(params_dir: str | os.PathLike) -> dict[str, tuple[int, ...]] | None:
    """Dotted path -> shape of every array of a saved param tree, from its metadata alone; None
    when the metadata does not read (a damaged checkpoint, which its restore then reports)."""
    with _checkpointer() as checkpointer:
        try:
            saved = _saved_tree(checkpointer, Path(params_dir))
        except Exception:  # orbax raises many types for a damaged directory
            return None
    return {".".join(map(str, path)): tuple(leaf.shape) for path, leaf in _flatten(saved)}


def run_vocab_rows(run_dir: str | os.PathLike) -> int | None:
    """The embedding rows (the padded vocabulary) a JAX training run's checkpoints hold, from the
    newest step whose metadata reads (every step of a run has the same); None without any."""
    checkpoints = Path(run_dir) / CHECKPOINTS_DIR
    steps = sorted((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()),
                   reverse=True) if checkpoints.is_dir() else []
    for step in steps:
        shapes = saved_shapes(checkpoints / str(step) / PARAMS_DIR)
        if shapes and "embed_tokens.embedding" in shapes:
            return shapes["embed_tokens.embedding"][0]
    return None


def _groups(tree: Mapping[str, Any], max_bytes: int) -> list[dict[str, Any]]:
    """The tree's array metadata split into subtrees of about max_bytes each, in order. Restoring
    a group at a time bounds tensorstore's read buffers, which a whole-tree restore holds for every
    array at once (1.7x the weights at the peak instead of 1.3x for HammerLLM-1.4B in 512 MiB
    groups, which restore it as fast as 1 GiB ones and ~0.4 s faster than 256 MiB ones)."""
    groups: list[dict[str, Any]] = [{}]
    size = 0
    for path, leaf in _flatten(tree):
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        _set(groups[-1], path, leaf)
        size += nbytes
    return groups


def _checkpointer():
    """orbax's PyTree checkpointer, writing numpy arrays as they are: its default deep-copies each
    (against a training loop changing them during an asynchronous save), a second copy of every
    weight that a conversion, which waits for the save, does not need. Uncompressed: zstd costs
    more time than the disk saves on weights (it takes a fifth off bfloat16 ones at half the
    speed). One zarr directory per array rather than OCDBT's shared files: HammerLLM-1.4B's tree
    saved in 4.9-6.3 s that way and in 8.4-10.3 s through OCDBT (2 cores, local disk), and the
    readers take either, the trainer's OCDBT checkpoints included."""
    import jax
    import orbax.checkpoint as ocp

    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                                         use_compression=False, use_ocdbt=False))
