"""GGUF, the one file llama.cpp runs: HF-named tensors and a SentencePiece tokenizer, written with the
`gguf` package (llama.cpp's own) in llama.cpp's layout.

    gguf_tensors(tensors, config) -> {gguf name: LazyTensor}   llama.cpp's names (gguf's own table),
                                                                the q/k rows permuted
    gguf_vocab(tokenizer, vocab_size) -> (pieces, scores, types)
    save_gguf(dst, config, tensors, *, tokenizer, dtype=None, generation_config=None) -> Path

llama.cpp rotates each head's (2i, 2i+1) pairs, HF's Llama its (i, i + D/2) halves (rotate_half), so
llama.cpp's converter reorders the rows of every q and k head; this module does the same, so that
the file is the one `convert_hf_to_gguf.py` writes. Norms stay float32 as there; in q8_0 a matrix whose
rows are not a multiple of the 32-value block is written in float16, as there too.
"""
from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from convert.hf import dtype_label
from convert.lazy import LazyTensor
from convert.mapping import ConvertError, check_hf
from hammer.config import ModelConfig
from hammer.fsio import atomic_path

ARCH = "llama"
# --dtype -> how matrices are stored (a gguf.GGMLQuantizationType name) and the file type llama.cpp shows.
DTYPES = {"float32": ("F32", "ALL_F32"), "float16": ("F16", "MOSTLY_F16"),
          "bfloat16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}


def permute_rope_rows(x: np.ndarray, heads: int) -> np.ndarray:
    """[heads * D, E] with each head's rows (i, i + D/2) made neighbours (2i, 2i+1): HF's RoPE halves
    as llama.cpp's interleaved pairs."""
    rows, cols = x.shape
    return x.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def gguf_tensors(tensors: Mapping[str, Any], config: ModelConfig) -> dict[str, LazyTensor]:
    """The config's HF-named tensors under llama.cpp's names, in table order, each made when used."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_layers)
    heads = {"self_attn.q_proj.weight": config.num_heads, "self_attn.k_proj.weight": config.num_kv_heads}
    out = {}
    for hf_name, x in check_hf(tensors, config).items():
        name = names.get_name(hf_name, try_suffixes=(".weight",))
        if name is None:  # a table entry gguf does not know: a bug in hammer or gguf, not in the input
            raise RuntimeError(f"gguf {gguf.__version__} has no llama.cpp name for {hf_name}")
        head_count = next((n for suffix, n in heads.items() if hf_name.endswith(suffix)), None)
        make = partial(np.asarray, x) if head_count is None else partial(_permuted, x, head_count)
        out[name] = LazyTensor(x.shape, x.dtype, make)
    return out


def _permuted(x, heads: int) -> np.ndarray:
    return permute_rope_rows(np.asarray(x), heads)


def gguf_vocab(tokenizer, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Each id's piece (UTF-8), score and llama.cpp token type, from the SentencePiece model itself;
    embedding rows past the model's pieces are unused `[PAD<i>]` tokens, as llama.cpp's converter
    names them."""
    import gguf

    tokenizer.check_fits(vocab_size, "being converted")
    kinds = type(tokenizer.proto).SentencePiece.Type
    pieces = [p.piece.encode() for p in tokenizer.proto.pieces]
    scores = [p.score for p in tokenizer.proto.pieces]
    # SentencePiece's piece types and llama.cpp's token types share their names (NORMAL, BYTE, ...);
    # a piece SentencePiece never emits (a `\0` piece under byte fallback) is unused, whatever its type.
    types = [int(gguf.TokenType.UNUSED if tokenizer.sp.is_unused(i) else gguf.TokenType[kinds.Name(p.type)])
             for i, p in enumerate(tokenizer.proto.pieces)]
    for i in range(len(pieces), vocab_size):
        pieces.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return pieces, scores, types


def save_gguf(dst: str | os.PathLike, config: ModelConfig, tensors: Mapping[str, Any], *,
              tokenizer=None, dtype: str | None = None,
              generation_config: Mapping[str, Any] | None = None) -> Path:
    """Writes one GGUF file that llama.cpp loads: the llama architecture's metadata, the tokenizer
    (pieces, scores, types, special ids, whether BOS/EOS and a leading `▁` are added) and the weights,
    matrices in `dtype` (default: the source's, float32 where it mixes dtypes), norms in float32.
    Tensors may be lazy: each is read, permuted, quantized and written in turn. Atomic."""
    import gguf

    from hammer.tokenizer import Tokenizer

    if not isinstance(tokenizer, Tokenizer):
        raise ConvertError("a GGUF file holds its tokenizer, and the model has no SentencePiece "
                           "tokenizer.model; pass --tokenizer DIR")
    named = gguf_tensors(tensors, config)
    if dtype is None:
        source = dtype_label(x for x in named.values() if x.ndim == 2)
        dtype = source if source in DTYPES else "float32"
    if dtype not in DTYPES:
        raise ConvertError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    matrix_type, file_type = DTYPES[dtype]
    types = {name: _storage(x.shape, gguf.GGMLQuantizationType[matrix_type]) for name, x in named.items()}
    pad_id = next((i for i in (tokenizer.pad_id, config.pad_token_id,
                               (generation_config or {}).get("pad_token_id")) if i is not None), None)
    with atomic_path(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        try:
            writer.add_name(Path(dst).stem)
            writer.add_file_type(gguf.LlamaFileType[file_type])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            _add_architecture(writer, config)
            _add_tokenizer(writer, tokenizer, config.vocab_size, pad_id)
            for name, x in named.items():
                nbytes = math.prod(gguf.quant_shape_to_byte_shape(x.shape, types[name]))
                writer.add_tensor_info(name, x.shape, np.dtype(np.float32), nbytes, raw_dtype=types[name])
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name, x in named.items():  # one tensor in memory at a time
                data = np.asarray(x).astype(np.float32, copy=False)
                writer.write_tensor_data(gguf.quants.quantize(data, types[name]))
        finally:
            writer.close()
    return Path(dst)


def _storage(shape: tuple[int, ...], matrix_type):
    """How one tensor is stored: norms (1-D) in float32; a matrix in `matrix_type`, or float16 where
    its rows do not fill the quantization's blocks."""
    import gguf

    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    block, _ = gguf.GGML_QUANT_SIZES[matrix_type]
    return matrix_type if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def _add_architecture(writer, config: ModelConfig) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


def _add_tokenizer(writer, tokenizer, vocab_size: int, pad_id: int | None) -> None:
    pieces, scores, types = gguf_vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("llama")  # SentencePiece, in llama.cpp's words
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for add_id, token_id in ((writer.add_bos_token_id, tokenizer.bos_id),
                             (writer.add_eos_token_id, tokenizer.eos_id),
                             (writer.add_unk_token_id, tokenizer.unk_id),
                             (writer.add_pad_token_id, pad_id)):
        if token_id is not None:
            add_id(token_id)
    writer.add_add_bos_token(tokenizer.special.add_bos_token)
    writer.add_add_eos_token(tokenizer.special.add_eos_token)
    writer.add_add_space_prefix(tokenizer.add_dummy_prefix)
