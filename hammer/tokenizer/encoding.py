"""The tokenizer every part of hammer uses: a Llama-format SentencePiece model, encoded as training did.

Ground truth is SentencePiece's own encoding of the text (its normalizer decides whether a dummy `▁`
prefix is added: HammerLLM's model adds none, Llama-2's adds one), plus BOS/EOS as the directory's
`add_bos_token` / `add_eos_token` say. That is what transformers 4.x's slow `LlamaTokenizer` with
`legacy: true` produced when HammerLLM was trained. Strings such as `<s>` inside a document are plain
text unless `parse_special_tokens=True` asks for transformers' habit of turning them into control ids.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from hammer.tokenizer import hf
from hammer.errors import HammerError

MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"


# "INTERNAL: src/trainer_interface.cc(123) [check] " before SentencePiece's own words, if any.
_SENTENCEPIECE_PREFIX = re.compile(r"^[A-Z_]+: (\S+\(\d+\) \[.*\])?")


class TokenizerError(HammerError):
    """A tokenizer file that is missing its parts or is not a SentencePiece model."""


@dataclass(frozen=True)
class SpecialTokens:
    """What a Llama-format directory says beyond the SentencePiece model itself."""

    add_bos_token: bool = True
    add_eos_token: bool = False
    bos_token: str | None = "<s>"
    eos_token: str | None = "</s>"
    unk_token: str | None = "<unk>"
    pad_token: str | None = None

    @classmethod
    def read(cls, directory: Path) -> "SpecialTokens":
        """Reads tokenizer_config.json, then special_tokens_map.json; absent keys keep Llama's defaults."""
        values: dict = {}
        for name in (CONFIG_FILE, SPECIAL_TOKENS_FILE):  # the map wins, as in transformers
            path = directory / name
            if not path.is_file():
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TokenizerError(f"{path} is not a JSON file: {e}") from None
            for key in ("add_bos_token", "add_eos_token"):
                if key in data:
                    values[key] = bool(data[key])
            for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                if key in data:
                    token = data[key]
                    values[key] = token.get("content") if isinstance(token, dict) else token
        return cls(**values)


class Tokenizer:
    """A SentencePiece model plus the Llama special-token rules; picklable, so it crosses processes."""

    def __init__(self, model_proto: bytes, special: SpecialTokens = SpecialTokens(), *,
                 parse_special_tokens: bool = False, name: str = "<memory>"):
        self._sp = _load_model(model_proto, name)
        self.model_proto = model_proto
        self.special = special
        self.parse_special_tokens = parse_special_tokens
        self.name = name
        self._fingerprint = hashlib.sha256(model_proto).hexdigest()
        self.bos_id = self._token_id(special.bos_token, self._sp.bos_id())
        self.eos_id = self._token_id(special.eos_token, self._sp.eos_id())
        self.unk_id = self._token_id(special.unk_token, self._sp.unk_id())
        # A pad token outside the model (an id transformers would add after the pieces) is never
        # produced by SentencePiece, so hammer has no pad id for it.
        self.pad_id = self._token_id(special.pad_token, self._sp.pad_id(), required=False)
        if special.add_bos_token and self.bos_id is None:
            raise TokenizerError(f"{name}: add_bos_token is true but the model has no BOS piece")
        if special.add_eos_token and self.eos_id is None:
            raise TokenizerError(f"{name}: add_eos_token is true but the model has no EOS piece")
        specials = {t: i for t, i in ((special.bos_token, self.bos_id), (special.eos_token, self.eos_id),
                                      (special.unk_token, self.unk_id), (special.pad_token, self.pad_id))
                    if t and i is not None}
        self._special_ids = specials
        # Longest first, so that a token that contains another is matched whole.
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, parse_special_tokens: bool = False) -> "Tokenizer":
        """Loads a directory holding tokenizer.model (and its HF json files), or a .model file itself."""
        path = Path(path)
        if path.is_dir():
            model_path, special = path / MODEL_FILE, SpecialTokens.read(path)
        elif path.is_file():
            model_path, special = path, SpecialTokens()
        else:
            raise FileNotFoundError(f"tokenizer {path} not found (expected a directory with {MODEL_FILE} "
                                    "or a SentencePiece .model file)")
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer directory {path} has no {MODEL_FILE}")
        return cls(model_path.read_bytes(), special, parse_special_tokens=parse_special_tokens,
                   name=str(model_path))

    def __reduce__(self):
        return (_rebuild, (self.model_proto, self.special, self.parse_special_tokens, self.name))

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def fingerprint(self) -> str:
        """sha256 of the tokenizer.model bytes: equal fingerprints encode text into equal pieces."""
        return self._fingerprint

    @property
    def sp(self) -> spm.SentencePieceProcessor:
        """The SentencePiece processor, for piece-level tools (coverage, merge)."""
        return self._sp

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text, with BOS/EOS per add_bos_token/add_eos_token when add_special_tokens."""
        if self.parse_special_tokens:
            ids = self._encode_with_specials(text)
        else:
            ids = self._sp.encode(text)
        return self._add_special(ids) if add_special_tokens else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True,
                     num_workers: int = 1) -> list[list[int]]:
        """Token ids of many texts; `num_workers` SentencePiece threads share the batch (the GIL is released)."""
        if num_workers < 1:
            raise TokenizerError(f"num_workers must be >= 1, got {num_workers}")
        if self.parse_special_tokens:
            batch = [self._encode_with_specials(t) for t in texts]
        else:
            batch = self._sp.encode(list(texts), num_threads=num_workers)
        return [self._add_special(ids) for ids in batch] if add_special_tokens else batch

    def check_fits(self, model_vocab_size: int, model: str) -> None:
        """Refuses to pair with a model whose embedding has fewer rows than this tokenizer has ids
        (more rows, vocab padding, are fine): past the table a JAX lookup clamps or gives NaN, silently."""
        if self.vocab_size > model_vocab_size:
            raise TokenizerError(f"tokenizer {self.name} has {self.vocab_size} pieces, more than the "
                                 f"{model_vocab_size} of model {model}; use the tokenizer the model was trained with")

    def decode(self, ids) -> str:
        """The text of `ids`; control ids (BOS, EOS, pad) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    @property
    def add_dummy_prefix(self) -> bool:
        """Whether SentencePiece puts a `▁` before every text (Llama-2's model does, HammerLLM's not)."""
        return self.proto.normalizer_spec.add_dummy_prefix

    @cached_property
    def proto(self) -> sentencepiece_model_pb2.ModelProto:
        """The parsed model: its pieces with their types and scores, its normalizer and trainer specs."""
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.model_proto)
        return proto

    @cached_property
    def piece_bytes(self) -> np.ndarray:
        """UTF-8 bytes of text each id stands for: one for a byte-fallback piece, none for a control or
        unknown piece (byte fallback leaves nothing unknown), else the piece's with `▁` as a space."""
        sp = self._sp
        return np.array([1 if sp.is_byte(i) else 0 if sp.is_control(i) or sp.is_unknown(i)
                         else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
                         for i in range(sp.vocab_size())], np.int64)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self._sp.piece_to_id(piece)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Writes tokenizer.model and the HF files that make transformers give this tokenizer's ids.

        Files already in `directory` are never replaced.
        """
        return hf.write_hf_files(self, Path(directory))

    def _add_special(self, ids: list[int]) -> list[int]:
        if self.special.add_bos_token:
            ids = [self.bos_id] + ids
        if self.special.add_eos_token:
            ids = ids + [self.eos_id]
        return ids

    def _encode_with_specials(self, text: str) -> list[int]:
        """Splits on special-token strings, as transformers' slow LlamaTokenizer (legacy) did."""
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text) if self._special_ids else ():
            if match.start() > start:
                ids += self._sp.encode(text[start:match.start()])
            ids.append(self._special_ids[match.group()])
            start = match.end()
        if start < len(text):
            ids += self._sp.encode(text[start:])
        return ids

    def _token_id(self, token: str | None, sp_default: int, required: bool = True) -> int | None:
        if token is None:
            return sp_default if sp_default >= 0 else None
        i = self._sp.piece_to_id(token)
        if i == self._sp.unk_id() and token != self._sp.id_to_piece(i):
            if not required:
                return None
            raise TokenizerError(f"{self.name}: special token {token!r} is not a piece of the model")
        return i


def _load_model(model_proto: bytes, name: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_proto)
    except (RuntimeError, OSError, TypeError) as e:
        reason = sentencepiece_reason(e) or f"its {len(model_proto)} bytes do not parse as a model"
        raise TokenizerError(f"{name} is not a SentencePiece model: {reason}") from None
    if sp.vocab_size() == 0:
        raise TokenizerError(f"{name} is not a SentencePiece model (no pieces)")
    return sp


def sentencepiece_reason(error: Exception) -> str:
    """SentencePiece's error message without its "INTERNAL: file.cc(line) [failed check]" prefix."""
    lines = str(error).strip().splitlines()
    return _SENTENCEPIECE_PREFIX.sub("", lines[-1]).strip() if lines else ""


def _rebuild(model_proto, special, parse_special_tokens, name):
    return Tokenizer(model_proto, special, parse_special_tokens=parse_special_tokens, name=name)
