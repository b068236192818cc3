"""Twin models from and to checkpoint directories, through `convert`'s reader and its HF names.

An HF directory or a hammer JAX directory is read by `convert.read_checkpoint` (numpy arrays with HF
names), so the JAX model and the twin convert into each other through convert's one mapping table.
The twin's state dict is HF's, so it is written by convert's HF writer: config.json + safetensors.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from hammer.config import ModelConfig
from hammer_torch.model import Llama


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                    attn_impl: str = "auto", compile: bool = False) -> Llama:
    """The twin of an HF directory (safetensors, sharded or not, or pytorch_model.bin) or of a
    hammer JAX directory; `compile` compiles each block in place."""
    import convert

    config, tensors = convert.read_checkpoint(path)
    model = from_tensors(config, convert.check_hf(tensors, config), dtype, attn_impl)
    return model.compile_blocks() if compile else model


def from_tensors(config: ModelConfig, tensors: Mapping[str, np.ndarray],
                 dtype: torch.dtype | None = torch.float32, attn_impl: str = "auto") -> Llama:
    """A twin holding HF-named numpy tensors (dtype None: theirs), loaded strictly, never
    randomly initialized first."""
    state = {name: to_torch(x) for name, x in tensors.items()}
    with torch.device("meta"):
        model = Llama(config, attn_impl=attn_impl)
    model = model.to_empty(device="cpu").to(dtype or state["model.norm.weight"].dtype)
    model.tie_weights()  # leaving the meta device made the head and the embedding two tensors
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_pretrained(model: Llama, dst: str | os.PathLike, *, tokenizer: Any = None,
                    dtype: str | None = None,
                    generation_config: Mapping[str, Any] | None = None) -> Path:
    """The twin's state dict as an HF directory, written by convert's one writer (atomic, refuses
    an existing dst); a tied head is left out, as HF leaves it out. dtype: "float32"/"bfloat16"."""
    import convert

    return convert.save_hf(dst, model.config, hf_tensors(model), tokenizer=tokenizer, dtype=dtype,
                           generation_config=generation_config)


def hf_tensors(model: Llama, snapshot: bool = False) -> dict[str, np.ndarray]:
    """The twin's weights with HF names as host arrays, a tied head left out as HF leaves it out.
    Without `snapshot` they share a CPU model's memory; with it they are a copy that a training
    step going on meanwhile cannot change."""
    from convert.hf import torch_to_numpy

    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return {name: torch_to_numpy(t.detach().to("cpu", copy=True) if snapshot else t)
            for name, t in state.items()}


def to_torch(x: np.ndarray) -> torch.Tensor:
    """A tensor sharing `x`'s memory where it can (copied only when read-only), bfloat16 included."""
    x = np.asarray(x)
    if not x.flags.writeable:
        x = x.copy()
    if x.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: the bits again
        return torch.from_numpy(np.ascontiguousarray(x).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(x)
