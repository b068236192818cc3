"""Tiny SentencePiece models trained on the spot, Llama-style (identity normalizer, byte fallback)."""
from __future__ import annotations

import io

import sentencepiece as spm

CORPUS = [
    "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。寒来暑往，秋收冬藏。",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "def add(a, b):\n    return a + b  # 加法\n",
    "北京是中国的首都，上海是最大的城市。我们在学习语言模型。",
    "for i in range(10):\n\tprint(i ** 2)\n",
    "Language models learn to predict the next token from the previous ones.",
] * 20


def train_tiny_model(add_dummy_prefix: bool, vocab_size: int = 499) -> bytes:
    """A BPE model with Llama's options; `add_dummy_prefix` picks Llama-2's or HammerLLM's rule."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=add_dummy_prefix,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return out.getvalue()
