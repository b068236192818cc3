"""Shared pieces of the data tests: a tokenizer whose ids are computable by hand, and a tiny SentencePiece one."""
from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm

from hammer.tokenizer import Tokenizer

BOS, EOS = 1, 2


class ByteTokenizer:
    """Ids are UTF-8 bytes + 3, BOS = 1, EOS = 2: tests can write the expected blocks down."""

    vocab_size = 259
    bos_id, eos_id = BOS, EOS
    fingerprint = "byte-tokenizer-for-tests"

    def encode_batch(self, texts, add_special_tokens=True, num_workers=1):
        assert not add_special_tokens, "prepare adds BOS/EOS itself"
        return [[b + 3 for b in t.encode("utf-8")] for t in texts]


def ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


def train_tiny_sentencepiece(directory: Path, vocab_size: int = 500) -> Tokenizer:
    """A byte-fallback BPE model on a few KB of English and Chinese, saved as a Llama-format directory."""
    lines = [f"The quick brown fox {i} jumps over the lazy dog; def f(x): return x * {i}" for i in range(200)]
    lines += ["我们今天学习中文，明天写代码。", "数据管道把文本变成令牌。"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "tokenizer_class": "LlamaTokenizer"}))
    return Tokenizer.from_pretrained(directory)


def write_jsonl(path: Path, texts, field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}, ensure_ascii=False) + "\n"
                            for i, t in enumerate(texts)), encoding="utf-8")
    return path
