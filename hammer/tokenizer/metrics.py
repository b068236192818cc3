"""How good a tokenizer is: vocab coverage of character sets, and compression of a corpus."""
from __future__ import annotations

import os
from dataclasses import dataclass

from hammer.documents import read_documents
from hammer.tokenizer.encoding import Tokenizer


@dataclass(frozen=True)
class Coverage:
    name: str
    covered: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.covered / self.total if self.total else 0.0


def is_covered(tok: Tokenizer, char: str) -> bool:
    """The vocab-coverage rule: alone and without special tokens, after dropping a leading `▁` piece,
    the character is exactly one piece that is not `<unk>` (byte-fallback pieces make it more than one)."""
    ids = tok.encode(char, add_special_tokens=False)
    if ids and tok.id_to_piece(ids[0]) == "▁":
        ids = ids[1:]
    return len(ids) == 1 and ids[0] != tok.unk_id


def coverage(tok: Tokenizer, charsets: dict[str, list[str]]) -> list[Coverage]:
    return [Coverage(name, sum(is_covered(tok, c) for c in chars), len(chars)) for name, chars in charsets.items()]


@dataclass(frozen=True)
class Compression:
    name: str
    bytes: int
    tokens: int
    base_tokens: int | None = None

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def compared(self) -> float | None:
        """Tokens of the tokenizer / tokens of the base on the same text: below 1 compresses better."""
        return self.tokens / self.base_tokens if self.base_tokens else None


def count_tokens(tok: Tokenizer, docs: list[str], num_workers: int = 1) -> int:
    return sum(len(ids) for ids in tok.encode_batch(docs, add_special_tokens=False, num_workers=num_workers))


def compression(tok: Tokenizer, files: list[str | os.PathLike], base: Tokenizer | None = None,
                num_workers: int = 1) -> list[Compression]:
    """Per file, then "overall": UTF-8 bytes, tokens (no special tokens) and, given a base, its tokens."""
    rows = []
    for path in files:
        docs = read_documents(path)
        rows.append(Compression(
            name=str(path), bytes=sum(len(d.encode("utf-8")) for d in docs),
            tokens=count_tokens(tok, docs, num_workers),
            base_tokens=count_tokens(base, docs, num_workers) if base is not None else None))
    rows.append(Compression(
        name="overall", bytes=sum(r.bytes for r in rows), tokens=sum(r.tokens for r in rows),
        base_tokens=sum(r.base_tokens for r in rows) if base is not None else None))
    return rows
