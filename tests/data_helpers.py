"""Shared pieces of the data tests: a tokenizer whose ids are computable by hand, and a jsonl writer."""
from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = 1, 2


class ByteTokenizer:
    """Ids are UTF-8 bytes + 3, BOS = 1, EOS = 2: tests can write the expected blocks down."""

    vocab_size = 259
    bos_id, eos_id = BOS, EOS
    fingerprint = "byte-tokenizer-for-tests"

    def encode_batch(self, texts, add_special_tokens=True):
        assert not add_special_tokens, "prepare adds BOS/EOS itself"
        return [[b + 3 for b in t.encode("utf-8")] for t in texts]


def ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    return path
