"""The one table between HF `LlamaForCausalLM` tensor names and hammer_jax parameter paths.

Both directions run from it. Every source shape is checked against the config, and any tensor
that is missing, unexpected, duplicated or unmapped fails naming the tensor.

hammer_jax pads the vocabulary axis of the embedding and the head with zero rows, to a multiple
of `VOCAB_MULTIPLE` (times the tensor axis of a training mesh), so it divides over a mesh. HF
tensors have the real vocabulary: the way in pads, the way out trims. A JAX tree of another
padding is read as well (a run trained on another mesh); trimming refuses to drop nonzero rows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import numpy as np

from convert.lazy import LazyTensor
from hammer.config import ModelConfig
from hammer.errors import HammerError


class ConvertError(HammerError):
    """A checkpoint that does not match its config or the Llama layout."""


# Rows of the JAX embedding and head are padded to a multiple of this (MaxText's choice: a
# vocabulary shard then fills whole 128-wide tiles of a TPU's matrix unit).
VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (105789 -> 105856 for 128)."""
    if multiple < 1:
        raise ValueError(f"vocab multiple {multiple} must be a positive integer")
    return -(-vocab_size // multiple) * multiple


# Shapes use one letter per size: V vocab, P padded vocab, E hidden, H heads, K kv heads, D head
# dim, M mlp; "HD" is H*D. JAX kernels keep HF's [out, in] layout, reshaped so heads keep their
# own axis: each conversion is a reshape (and the vocabulary's padding), never a transpose.
# `{}` is the layer index.
#   HF name                                      JAX path                               HF      JAX
TABLE = (
    ("model.embed_tokens.weight",                "embed_tokens.embedding",              "V E",  "P E"),
    ("model.layers.{}.input_layernorm.weight",   "layers.{}.input_layernorm.scale",     "E",    "E"),
    ("model.layers.{}.self_attn.q_proj.weight",  "layers.{}.self_attn.q_proj.kernel",   "HD E", "H D E"),
    ("model.layers.{}.self_attn.k_proj.weight",  "layers.{}.self_attn.k_proj.kernel",   "KD E", "K D E"),
    ("model.layers.{}.self_attn.v_proj.weight",  "layers.{}.self_attn.v_proj.kernel",   "KD E", "K D E"),
    ("model.layers.{}.self_attn.o_proj.weight",  "layers.{}.self_attn.o_proj.kernel",   "E HD", "E H D"),
    ("model.layers.{}.post_attention_layernorm.weight", "layers.{}.post_attention_layernorm.scale", "E", "E"),
    ("model.layers.{}.mlp.gate_proj.weight",     "layers.{}.mlp.gate_proj.kernel",      "M E",  "M E"),
    ("model.layers.{}.mlp.up_proj.weight",       "layers.{}.mlp.up_proj.kernel",        "M E",  "M E"),
    ("model.layers.{}.mlp.down_proj.weight",     "layers.{}.mlp.down_proj.kernel",      "E M",  "E M"),
    ("model.norm.weight",                        "norm.scale",                          "E",    "E"),
    ("lm_head.weight",                           "lm_head.kernel",                      "V E",  "P E"),
)
# Buffers older transformers saved beside the weights; recomputed, never loaded.
DROPPED = ("model.layers.{}.self_attn.rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Tensor:
    hf: str
    jax: tuple[str | int, ...]
    hf_shape: tuple[int, ...]
    jax_shape: tuple[int, ...]
    vocab_axis: int | None = None  # the JAX axis of the padded vocabulary, if any

    def to_jax(self, x) -> np.ndarray:
        """The HF tensor in JAX layout (a view where it can be), the vocabulary padded with zero
        rows."""
        _check_shape(self.hf, x, self.hf_shape)
        x = np.asarray(x)
        return x.reshape(self.jax_shape) if self.vocab_axis is None else _padded(x, self.jax_shape)

    def to_hf(self, x) -> np.ndarray:
        """The JAX tensor (of any vocabulary padding) in HF layout, the padding trimmed."""
        self.check_jax(x)
        return np.ascontiguousarray(self.trimmed(np.asarray(x)).reshape(self.hf_shape))

    def check_jax(self, x) -> None:
        """The JAX shape, except that the vocabulary may have any padding."""
        shape = list(self.jax_shape)
        if (self.vocab_axis is not None and len(x.shape) == len(shape)
                and x.shape[self.vocab_axis] >= self.vocab):
            shape[self.vocab_axis] = x.shape[self.vocab_axis]
        if tuple(x.shape) != tuple(shape):
            raise ConvertError(f"tensor {_dotted(self.jax)} has shape {tuple(x.shape)}, expected "
                               f"{tuple(shape)}{layout_hint(x.shape, shape)}")

    @property
    def vocab(self) -> int:
        return self.hf_shape[0]  # the vocabulary's HF tensors are [vocab, hidden]

    def trimmed(self, x: np.ndarray) -> np.ndarray:
        """x with its vocabulary axis cut to the real vocabulary (a view); padded rows that are
        not zero would be weights lost, which is refused."""
        if self.vocab_axis is None or x.shape[self.vocab_axis] == self.vocab:
            return x
        real, padding = np.split(x, [self.vocab], axis=self.vocab_axis)
        if np.any(padding):
            raise ConvertError(f"tensor {_dotted(self.jax)} has nonzero values in its padded rows "
                               f"past vocab_size {self.vocab}: not a padded vocabulary")
        return real

    def repadded(self, x, rows: int) -> np.ndarray:
        """x (any padding) with `rows` rows on its vocabulary axis."""
        self.check_jax(x)
        if x.shape[self.vocab_axis] == rows:
            return x
        shape = list(x.shape)
        shape[self.vocab_axis] = rows
        return _padded(self.trimmed(np.asarray(x)), tuple(shape))


def _padded(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """x in the top-left corner of zeros of `shape`."""
    if x.shape == shape:
        return np.ascontiguousarray(x)
    out = np.zeros(shape, x.dtype)
    out[tuple(slice(0, n) for n in x.shape)] = x
    return out


def tensors(config: ModelConfig, vocab_rows: int | None = None) -> list[Tensor]:
    """Every tensor the config's Llama has, each layer's entries spelled out; the JAX vocabulary
    has `vocab_rows` rows (default: padded to VOCAB_MULTIPLE)."""
    c = config
    rows = padded_vocab_size(c.vocab_size) if vocab_rows is None else vocab_rows
    if rows < c.vocab_size:
        raise ConvertError(f"{rows} vocabulary rows cannot hold vocab_size {c.vocab_size}")
    sizes = {"V": c.vocab_size, "P": rows, "E": c.hidden_size, "H": c.num_heads,
             "K": c.num_kv_heads, "D": c.head_dim, "M": c.intermediate_size}

    def shape(spec):
        return tuple(int(np.prod([sizes[ch] for ch in dim])) for dim in spec.split())

    out = []
    for hf, jax_path, hf_spec, jax_spec in TABLE:
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue
        for i in range(c.num_layers) if "{}" in hf else [None]:
            path = tuple(i if part == "{}" else part for part in jax_path.split("."))
            vocab_axis = jax_spec.split().index("P") if "P" in jax_spec else None
            out.append(Tensor(hf.format(i), path, shape(hf_spec), shape(jax_spec), vocab_axis))
    return out


def check_hf(hf_tensors: Mapping[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Exactly the tensors the config's Llama has, in table order, each shape checked. Buffers
    older transformers saved and a tied head that equals the embedding are dropped."""
    hf_tensors = dict(hf_tensors)
    _drop_tied_head(hf_tensors, config)
    expected = tensors(config)
    _check_names(set(hf_tensors) - _dropped_names(hf_tensors), {t.hf for t in expected}, "HF")
    for t in expected:
        _check_shape(t.hf, hf_tensors[t.hf], t.hf_shape)
    return {t.hf: hf_tensors[t.hf] for t in expected}


def hf_to_jax(hf_tensors: Mapping[str, np.ndarray], config: ModelConfig,
              scan_layers: bool = False) -> dict[str, Any]:
    """HF name -> array to hammer_jax's nested param dict (`nnx.State.to_pure_dict()` layout),
    the vocabulary padded to VOCAB_MULTIPLE (`fit_vocab` pads it otherwise).
    With `scan_layers` each layer entry is stacked over a leading layer axis. Lazy tensors are
    read one at a time, each dropped once its JAX array is made."""
    hf_tensors = check_hf(hf_tensors, config)
    params: dict[str, Any] = {}
    for t in tensors(config):
        _set(params, t.jax, t.to_jax(hf_tensors[t.hf]))
    return layer_layout(params, config, scan_layers)


def layer_layout(params: Mapping[str, Any], config: ModelConfig, stacked: bool) -> dict[str, Any]:
    """hammer_jax's nested param dict, stacked or per-layer (keys int or str), with every tensor's
    presence and shape checked, its layers stacked over a leading axis (`scan_layers`) or one
    int-keyed entry per layer. The vocabulary keeps its padding, whatever it is."""
    params = dict(params)
    layers = params.get("layers", {})
    was_stacked = bool(layers) and not all(str(k).isdigit() for k in layers)
    if was_stacked:  # split the layer axis
        for path, x in _flatten(layers):
            if np.shape(x)[:1] != (config.num_layers,):
                raise ConvertError(f"stacked JAX tensor {_dotted(('layers', *path))} has shape "
                                   f"{tuple(np.shape(x))}, expected a leading axis of "
                                   f"num_layers={config.num_layers}")
        params["layers"] = {i: map_leaves(lambda x: x[i], layers) for i in range(config.num_layers)}
    else:
        params["layers"] = {int(k): v for k, v in layers.items()}
    flat = dict(_flatten(params))
    expected = tensors(config)
    _check_names(set(flat), {t.jax for t in expected}, "JAX", name=_dotted)
    for t in expected:
        t.check_jax(flat[t.jax])
    if stacked:
        per_layer = (params["layers"][i] for i in range(config.num_layers))
        params["layers"] = layers if was_stacked else map_leaves(lambda *xs: np.stack(xs), *per_layer)
    return params


def jax_to_hf(params: Mapping[str, Any], config: ModelConfig) -> dict[str, np.ndarray]:
    """hammer_jax's nested param dict, stacked or per-layer (keys int or str), to HF names."""
    return {name: np.asarray(x) for name, x in jax_as_hf(params, config).items()}


def jax_as_hf(params: Mapping[str, Any], config: ModelConfig) -> dict[str, LazyTensor]:
    """`jax_to_hf` with each HF tensor made (trimmed, reshaped) only when it is used, so a
    writer holds the params and one HF tensor, not a second copy of every weight."""
    flat = dict(_flatten(layer_layout(params, config, stacked=False)))
    return {t.hf: LazyTensor(t.hf_shape, flat[t.jax].dtype, partial(t.to_hf, flat[t.jax]))
            for t in tensors(config)}


def fit_vocab(params: Mapping[str, Any], config: ModelConfig, vocab_rows: int) -> dict[str, Any]:
    """hammer_jax's nested param dict with the vocabulary (of any padding) padded to `vocab_rows`,
    e.g. a checkpoint trained on a 2-way tensor axis (256) read on one device (128)."""
    params = dict(params)
    for t in tensors(config, vocab_rows):
        if t.vocab_axis is not None and t.jax[0] in params:
            module, name = t.jax
            params[module] = {**params[module], name: t.repadded(params[module][name], vocab_rows)}
    return params


def _drop_tied_head(hf_tensors: dict[str, np.ndarray], config: ModelConfig) -> None:
    """Some exporters save a tied head anyway; it must be the embedding, then it is redundant."""
    head = hf_tensors.get("lm_head.weight")
    embed = hf_tensors.get("model.embed_tokens.weight")
    if config.tie_word_embeddings and head is not None and embed is not None:
        if head.shape != embed.shape or not np.array_equal(head, embed):
            raise ConvertError("lm_head.weight differs from model.embed_tokens.weight although "
                               "tie_word_embeddings is true")
        del hf_tensors["lm_head.weight"]


def _dropped_names(hf_tensors) -> set[str]:
    patterns = [re.compile(re.escape(p).replace(r"\{\}", r"\d+") + "$") for p in DROPPED]
    return {n for n in hf_tensors if any(p.match(n) for p in patterns)}


def _check_names(got: set, want: set, kind: str, name=str) -> None:
    missing, unexpected = sorted(want - got, key=str), sorted(got - want, key=str)
    if missing:
        raise ConvertError(f"missing {kind} tensor {name(missing[0])}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise ConvertError(f"unexpected {kind} tensor {name(unexpected[0])}"
                           + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


def layout_hint(shape, expected) -> str:
    """What a JAX shape that holds the expected sizes in another order most likely is."""
    if sorted(shape) != sorted(expected) or tuple(shape) == tuple(expected):
        return ""
    return ("; the same sizes in another order are the [in, out] kernels of hammer de87e8a and "
            "earlier: export the checkpoint to HF with that version (hammer convert --to hf), "
            "which this one reads")


def _check_shape(name: str, x: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(x.shape) != shape:
        raise ConvertError(f"tensor {name} has shape {tuple(x.shape)}, expected {shape}")


def _dotted(path) -> str:
    return ".".join(str(p) for p in path)


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def leaves(tree) -> list:
    """The leaves of nested dicts, in order."""
    return [x for _, x in _flatten(tree)]


def map_leaves(fn, *trees):
    """fn over the leaves of nested dicts of one structure."""
    first = trees[0]
    if isinstance(first, Mapping):
        return {k: map_leaves(fn, *(t[k] for t in trees)) for k in first}
    return fn(*trees)
