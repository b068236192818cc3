"""Reading and writing HuggingFace Llama directories as (ModelConfig, HF name -> numpy array).

safetensors is read with numpy (bfloat16 as ml_dtypes.bfloat16), so torch is imported only
for pytorch_model.bin, and then with `weights_only=True`: a checkpoint is data, never code.
`open_hf` reads a safetensors tensor only when it is used and `save_hf` writes one at a time, so a
conversion streams: it never holds every weight twice (`bench/convert_throughput.py` measures it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from convert.lazy import LazyTensor
from convert.mapping import ConvertError
from hammer.config import ModelConfig
from hammer.fsio import atomic_directory
from hammer.run import CHECKPOINTS_DIR

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
# Prefixes torch.compile and DistributedDataParallel put in front of every state-dict name.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
GENERATION_FILE = "generation_config.json"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
# The safetensors header's dtype codes of the float types a checkpoint's weights may have.
SAFETENSORS_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
                      "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
MAX_SHARD_BYTES = 5 * 2**30
_TORCH_STEP_DIR = re.compile(r"step_(\d+)")  # the torch trainer's checkpoints/step_<N>/


def is_hf_dir(path: str | os.PathLike) -> bool:
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def torch_step_dirs(directory: Path) -> list[Path]:
    """The complete checkpoints (`step_<N>/`) of a torch run's checkpoint directory, oldest first;
    the temporaries of a killed save are excluded."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir()
             if (m := _TORCH_STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def newest_torch_checkpoint(path: Path) -> Path:
    """A torch training run directory stands for its newest checkpoint (`checkpoints/step_<N>/`,
    each an HF directory); any other path is itself."""
    if is_hf_dir(path):
        return path
    steps = [p for p in torch_step_dirs(path / CHECKPOINTS_DIR) if is_hf_dir(p)]
    return steps[-1] if steps else path


def load_hf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """config.json and every tensor of an HF directory, wrapper prefixes stripped."""
    config, tensors = open_hf(path)
    return config, {name: np.asarray(x) for name, x in tensors.items()}


def open_hf(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, LazyTensor | np.ndarray]]:
    """`load_hf` with each safetensors tensor read from disk only when used (`np.asarray`), and
    then alone (pread, not a memory map whose pages would stay resident); pytorch_model.bin is
    read whole."""
    path = newest_torch_checkpoint(Path(path))
    if not path.is_dir():
        raise FileNotFoundError(f"no model directory at {path}")
    config = ModelConfig.from_hf(path)
    tensors: dict[str, LazyTensor | np.ndarray] = {}
    for file in _weight_files(path):
        for name, array in _open(file).items():
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


def save_hf(dst: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, Any], *,
            tokenizer: Any = None, dtype: str | None = None,
            generation_config: Mapping[str, Any] | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Writes an HF directory that `AutoModelForCausalLM.from_pretrained` loads: config.json,
    generation_config.json (the given one, else derived from the config), safetensors (sharded past
    `max_shard_bytes`, with the index) and, given a tokenizer (anything with
    `save_pretrained(dir)`), its files. Tensors may be lazy; each is made when it is written.
    config.json's torch_dtype is the weights' one dtype, absent when they mix dtypes (transformers
    then takes each tensor's own). Atomic: all or nothing."""
    tensors = cast(tensors, dtype)
    with atomic_directory(dst) as tmp:
        config.save(tmp, dtype=dtype_label(tensors.values()))
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


def cast(tensors: Mapping[str, Any], dtype: str | None) -> dict[str, Any]:
    """The tensors in `dtype` (None: as they are), each cast only when it is used."""
    if dtype is None:
        return dict(tensors)
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return {name: LazyTensor(x.shape, DTYPES[dtype], partial(to_dtype, x, dtype))
            for name, x in tensors.items()}


def to_dtype(x, dtype: str) -> np.ndarray:
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return np.asarray(x).astype(DTYPES[dtype], copy=False)


def dtype_label(arrays: Iterable[Any]) -> str | None:
    """config.json's torch_dtype for these weights: their one dtype's name, None when they mix."""
    names = {np.dtype(x.dtype).name for x in arrays}
    return names.pop() if len(names) == 1 else None


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


def _open(file: Path) -> dict[str, LazyTensor | np.ndarray]:
    """name -> array of one weight file, lazy for safetensors; a file that is not one fails naming it."""
    if file.suffix != ".safetensors":
        return _read_torch_bin(file)
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():
                info = f.get_slice(name)
                if info.get_dtype() not in SAFETENSORS_DTYPES:
                    raise ConvertError(f"tensor {name} in {file} has dtype {info.get_dtype()}, expected "
                                       f"one of {', '.join(SAFETENSORS_DTYPES)}")
                out[name] = LazyTensor(info.get_shape(), SAFETENSORS_DTYPES[info.get_dtype()],
                                       partial(_read_tensor, file, name))
    except SafetensorError as e:
        raise ConvertError(f"{file} is not a readable safetensors file: {e}") from None
    return out


def _read_tensor(file: Path, name: str) -> np.ndarray:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="numpy", backend="pread") as f:
            return f.get_tensor(name)
    except SafetensorError as e:
        raise ConvertError(f"{file} is not a readable safetensors file: {e}") from None


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


def _write_safetensors(dst: Path, tensors: Mapping[str, Any], max_shard_bytes: int) -> None:
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if len(shards) == 1:
        _write_safetensors_file(dst / "model.safetensors", shards[0])
        return
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors_file(dst / file, shard)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
             "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_safetensors_file(file: Path, tensors: Mapping[str, Any]) -> None:
    """One safetensors file, a tensor at a time: safetensors' own writer takes every tensor at once,
    which for a lazy source would hold the whole model. The format is a little-endian u64 header
    length, the JSON header (names, dtype codes, shapes, byte offsets) padded to 8 bytes, the data."""
    codes = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for name, x in tensors.items():
        if np.dtype(x.dtype) not in codes:
            raise ConvertError(f"tensor {name} has dtype {x.dtype}, which safetensors weights are not "
                               f"written in (expected one of {sorted(d.name for d in codes)})")
        header[name] = {"dtype": codes[np.dtype(x.dtype)], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(file, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x).reshape(-1).view(np.uint8).data)
