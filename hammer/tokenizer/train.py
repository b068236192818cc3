"""SentencePiece BPE training with HammerLLM's and Llama's options, from txt/jsonl files.

The model is trained the way HammerLLM's was: BPE, no text normalization, no dummy `▁` prefix, runs
of spaces kept, ids 0/1/2 for <unk>/<s>/</s>, no pad piece; byte fallback and split digits by default.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import sentencepiece as spm

from hammer.documents import read_documents, split_lines
from hammer.errors import HammerError
from hammer.tokenizer.encoding import sentencepiece_reason


class TrainError(HammerError):
    """Training inputs SentencePiece cannot use (an empty corpus, a vocab too small for its characters)."""


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    split_digits: bool = True
    user_defined_symbols: list[str] = field(default_factory=list)
    required_chars: list[str] = field(default_factory=list)
    max_sentence_length: int = 16384
    input_sentence_size: int = 0  # 0: every sentence; else a random sample of this many
    num_threads: int = os.cpu_count() or 1

    def __post_init__(self):
        if self.vocab_size < 8:
            raise TrainError(f"vocab size must be at least 8, got {self.vocab_size}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise TrainError(f"character coverage must be in (0, 1], got {self.character_coverage}")


def corpus_sentences(files: list[str | os.PathLike]) -> list[str]:
    """The training sentences: the non-empty lines of every document of every file."""
    if not files:
        raise TrainError("no training files given")
    sentences = [line for path in files for doc in read_documents(path) for line in split_lines(doc) if line.strip()]
    if not sentences:
        raise TrainError(f"the training corpus ({', '.join(map(str, files))}) holds no text")
    return sentences


def train(sentences: list[str], config: TrainConfig) -> bytes:
    """The serialized SentencePiece model trained on `sentences`."""
    if not sentences:
        raise TrainError("the training corpus holds no text")
    out = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=out, model_type="bpe",
            vocab_size=config.vocab_size, character_coverage=config.character_coverage,
            byte_fallback=config.byte_fallback, split_digits=config.split_digits,
            user_defined_symbols=config.user_defined_symbols, required_chars="".join(config.required_chars),
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, max_sentence_length=config.max_sentence_length,
            input_sentence_size=config.input_sentence_size, shuffle_input_sentence=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=config.num_threads, minloglevel=2,
        )
    except RuntimeError as e:
        raise TrainError(f"SentencePiece training failed: {sentencepiece_reason(e)}") from None
    return out.getvalue()
