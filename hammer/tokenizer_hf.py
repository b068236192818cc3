"""HuggingFace tokenizer files for a hammer Tokenizer, written so transformers encodes as hammer does.

transformers 5 builds LlamaTokenizer from the SentencePiece pieces and puts a `▁` before every text
unless told `add_prefix_space: false`; for a model trained without a dummy prefix (HammerLLM's) that
default gives ids the model never saw (`"你好 world"` -> `[1, 262, 76379, 2028]`, not `[1, 76379, 2028]`).
So the prefix flag is written from the SentencePiece normalizer itself, for the fast and slow classes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from sentencepiece import sentencepiece_model_pb2

from hammer.fsio import atomic_file

if TYPE_CHECKING:
    from hammer.tokenizer import Tokenizer


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def hf_files(tok: "Tokenizer") -> dict[str, bytes]:
    """File name -> contents of the HF tokenizer files of `tok`."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok.model_proto)
    special = tok.special
    tokens = {key: getattr(special, key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": special.add_bos_token,
        "add_eos_token": special.add_eos_token,
        # Follow the model's own normalizer: transformers 5 otherwise always adds the `▁` prefix.
        "add_prefix_space": proto.normalizer_spec.add_dummy_prefix,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
        "sp_model_kwargs": {},
        **{k: (_added_token(v) if v else None) for k, v in tokens.items()},
    }
    special_map = {k: _added_token(v) for k, v in tokens.items() if v}
    return {
        "tokenizer.model": tok.model_proto,
        "tokenizer_config.json": (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode(),
        "special_tokens_map.json": (json.dumps(special_map, indent=2, ensure_ascii=False) + "\n").encode(),
    }


def write_hf_files(tok: "Tokenizer", directory: Path) -> Path:
    """Writes the files into `directory` (created if absent), refusing to replace any existing file."""
    files = hf_files(tok)
    directory.mkdir(parents=True, exist_ok=True)
    taken = [name for name in files if (directory / name).exists()]
    if taken:
        raise FileExistsError(f"{directory} already holds {', '.join(taken)}; refusing to overwrite")
    for name, data in files.items():
        with atomic_file(directory / name, "wb") as f:
            f.write(data)
    return directory
