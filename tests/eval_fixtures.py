"""Tiny models for the tests: random HF-named weights for any ModelConfig, and a Llama-format model
directory (random LlamaForCausalLM + a SentencePiece tokenizer trained on the spot) with domain
files for the eval and generation tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.tokenizer_fixtures import write_tiny_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog, then naps in the sun for 15 minutes.",
    "Language models learn to predict the next token from the ones before it.",
    "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。寒来暑往，秋收冬藏。",
    "北京是中国的首都，上海是最大的城市。我们在学习语言模型。",
    "def add(a, b):\n    return a + b  # sum of two numbers\n",
    "for i in range(10):\n    print(i * i, end=' ')\n",
    "Perplexity is the exponential of the mean negative log likelihood per token.",
    "Bits per byte compare models whose tokenizers differ; 8 bits make 1 byte.",
]

# Prime-ish, all distinct, so that a transposed weight cannot pass; GQA with 5 query heads per KV head.
MODEL_DIMS = dict(hidden_size=60, intermediate_size=94, num_hidden_layers=2, num_attention_heads=5,
                  num_key_value_heads=1, head_dim=12, max_position_embeddings=112)
VOCAB_SIZE = 401


def random_hf_tensors(config, *, std: float, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Every tensor of `config`'s Llama by HF name, drawn by numpy (no initializer to compile):
    matrices N(0, std), norm scales 1 + N(0, 2 std) so that a lost or misplaced scale shows."""
    import convert

    rng = np.random.default_rng(seed)
    return {t.hf: ((1 + 2 * std * rng.standard_normal(t.hf_shape)) if t.hf.endswith("norm.weight")
                   else std * rng.standard_normal(t.hf_shape)).astype(dtype)
            for t in convert.tensors(config)}


def write_model(directory: Path, seed: int = 0) -> None:
    """A random LlamaForCausalLM saved with save_pretrained, in float32.

    A wide initializer spreads the logits, so greedy decoding meets no near-ties that float32
    rounding could flip between backends.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB_SIZE, initializer_range=0.25, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         **MODEL_DIMS)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)


def write_model_dir(directory: Path, seed: int = 0) -> Path:
    write_model(directory, seed)
    write_tiny_tokenizer(directory, VOCAB_SIZE)
    return directory


def write_domain_files(directory: Path) -> dict[str, Path]:
    """Two small domains: English/code as jsonl, Chinese as txt (one document per line)."""
    en = directory / "en.jsonl"
    en.write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                          for i, t in enumerate(TEXTS[:2] + TEXTS[4:] + ["x"])))
    zh = directory / "zh.txt"
    zh.write_text("\n".join(TEXTS[2:4] + ["语言模型。" * 3, "我们在学习"]) + "\n")
    return {"en": en, "zh": zh}
