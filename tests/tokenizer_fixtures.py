"""The one tiny SentencePiece model of the tests, trained on the spot with HammerLLM's options (BPE,
identity normalizer, byte fallback, split digits, runs of spaces kept, ids 0/1/2 for <unk>/<s>/</s>)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm

from hammer.tokenizer import Tokenizer

CORPUS = [
    "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。寒来暑往，秋收冬藏。",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "def add(a, b):\n    return a + b  # 加法\n",
    "北京是中国的首都，上海是最大的城市。我们在学习语言模型。",
    "for i in range(10):\n\tprint(i ** 2)\n",
    "Language models learn to predict the next token from the previous ones.",
    "Perplexity is the exponential of the mean negative log likelihood per token.",
    "Bits per byte compare models whose tokenizers differ; 8 bits make 1 byte.",
] * 20


def train_tiny_model(add_dummy_prefix: bool = False, vocab_size: int = 499) -> bytes:
    """The serialized model; `add_dummy_prefix` picks Llama-2's rule (a `▁` before the text) over HammerLLM's."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, model_type="bpe", vocab_size=vocab_size,
        character_coverage=1.0, byte_fallback=True, split_digits=True, add_dummy_prefix=add_dummy_prefix,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return out.getvalue()


def write_tiny_tokenizer(directory: Path, vocab_size: int = 499) -> Tokenizer:
    """The tiny model written as HammerLLM released its tokenizer: tokenizer.model and a slow
    `LlamaTokenizer` config, which transformers 5.x reads with a `▁` prefix the model never saw, so a
    test reading this directory through transformers instead of hammer gets other ids."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(train_tiny_model(vocab_size=vocab_size))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}))
    return Tokenizer.from_pretrained(directory)
