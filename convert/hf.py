"""Reading and writing HuggingFace Llama directories as (ModelConfig, HF name -> numpy array).

safetensors is read with numpy (bfloat16 as ml_dtypes.bfloat16), so torch is imported only
for pytorch_model.bin, and then with `weights_only=True`: a checkpoint is data, never code.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from convert.mapping import ConvertError
from hammer.config import ModelConfig
from hammer.fsio import atomic_directory

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
# Prefixes torch.compile and DistributedDataParallel put in front of every state-dict name.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
GENERATION_FILE = "generation_config.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
MAX_SHARD_BYTES = 5 * 2**30


def is_hf_dir(path: str | os.PathLike) -> bool:
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def load_hf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """config.json and every tensor of an HF directory, wrapper prefixes stripped."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {path}")
    config = ModelConfig.from_hf(path)
    tensors: dict[str, np.ndarray] = {}
    for file in _weight_files(path):
        for name, array in _read(file).items():
            name = strip_wrapper_prefixes(name)
            if name in tensors:
                raise ConvertError(f"tensor {name} appears twice in {path}")
            tensors[name] = array
    embed = tensors.get("model.embed_tokens.weight")
    if embed is not None and embed.shape[0] != config.vocab_size:
        raise ConvertError(f"config.json vocab_size {config.vocab_size} disagrees with "
                           f"model.embed_tokens.weight, which has {embed.shape[0]} rows")
    return config, tensors


def strip_wrapper_prefixes(name: str) -> str:
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def save_hf(dst: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, np.ndarray], *,
            tokenizer: Any = None, dtype: str | None = None,
            generation_config: Mapping[str, Any] | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Writes an HF directory that `AutoModelForCausalLM.from_pretrained` loads: config.json,
    generation_config.json (the given one, else derived from the config), safetensors (sharded past
    `max_shard_bytes`, with the index) and, given a tokenizer (anything with
    `save_pretrained(dir)`), its files. Atomic: all or nothing."""
    tensors = cast(tensors, dtype)
    dtype_name = dtype or _dtype_name(tensors)
    with atomic_directory(dst) as tmp:
        config.save(tmp, dtype=dtype_name)
        if generation_config is None:
            generation_config = {"_from_model_config": True, "bos_token_id": config.bos_token_id,
                                 "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
        write_generation_config(tmp, generation_config)
        _write_safetensors(tmp, tensors, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(dst)


def read_generation_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """A model directory's generation_config.json (HammerLLM's holds the pad id its config.json
    lacks), carried through conversions; None when there is none."""
    file = Path(path) / GENERATION_FILE
    if not file.is_file():
        return None
    try:
        generation = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(generation, dict):
        raise ConvertError(f"{file} holds a {type(generation).__name__}, expected a JSON object")
    return generation


def write_generation_config(directory: Path, generation: Mapping[str, Any]) -> None:
    (directory / GENERATION_FILE).write_text(json.dumps(dict(generation), indent=2) + "\n")


def cast(tensors: Mapping[str, np.ndarray], dtype: str | None) -> dict[str, np.ndarray]:
    if dtype is None:
        return dict(tensors)
    return {name: to_dtype(x, dtype) for name, x in tensors.items()}


def to_dtype(x, dtype: str) -> np.ndarray:
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return np.asarray(x).astype(DTYPES[dtype], copy=False)


class TokenizerFiles:
    """The tokenizer files of a model directory, carried into a converted one."""

    def __init__(self, src: str | os.PathLike):
        self.files = [Path(src) / n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]

    def __bool__(self) -> bool:
        return bool(self.files)

    def save_pretrained(self, dst: str | os.PathLike) -> None:
        for f in self.files:
            shutil.copy2(f, Path(dst) / f.name)


def _weight_files(path: Path) -> list[Path]:
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ConvertError(f"{index} is not a JSON object: {e}") from None
            if not isinstance(weight_map, dict):
                raise ConvertError(f"{index} has no weight_map")
            files = [path / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} lists {missing[0]}, which is not in {path}")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [path / name]
    raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILES)}")


def _read(file: Path) -> dict[str, np.ndarray]:
    """name -> array of one weight file; a file that is not one fails naming it."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(file, framework="numpy") as f:
                return {name: f.get_tensor(name) for name in f.keys()}
        except SafetensorError as e:
            raise ConvertError(f"{file} is not a readable safetensors file: {e}") from None
    return _read_torch_bin(file)


def _read_torch_bin(file: Path) -> dict[str, np.ndarray]:
    import pickle

    import torch

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConvertError(f"{file} holds objects other than tensors and containers, which "
                           f"hammer refuses to unpickle (weights_only=True)") from None
    except (RuntimeError, EOFError) as e:
        reason = (str(e) or type(e).__name__).splitlines()[0]
        raise ConvertError(f"{file} is not a readable torch state dict: {reason}") from None
    if not isinstance(state, Mapping):
        raise ConvertError(f"{file} holds a {type(state).__name__}, expected a state dict")
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):  # e.g. a trainer checkpoint {"model": ..., "optimizer": ...}
            raise ConvertError(f"{file}: entry {name!r} is a {type(t).__name__}, expected a tensor "
                               f"(a flat state dict)")
        out[name] = torch_to_numpy(t)
    return out


def torch_to_numpy(t) -> np.ndarray:
    """A torch tensor as a numpy array on the CPU, bfloat16 as ml_dtypes.bfloat16."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: move the bits, not the values
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _write_safetensors(dst: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> None:
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(x)
        size += x.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors without it
    if len(shards) == 1:
        save_file(shards[0], dst / "model.safetensors", metadata=metadata)
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, dst / file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
             "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _dtype_name(tensors: Mapping[str, np.ndarray]) -> str:
    names = {name for name, dt in DTYPES.items() for x in tensors.values() if x.dtype == dt}
    return names.pop() if len(names) == 1 else "float32"
