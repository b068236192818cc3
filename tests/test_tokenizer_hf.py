"""transformers, fast and slow, reads the files hammer writes and encodes exactly as hammer does."""
import random

import pytest

from hammer.tokenizer import Tokenizer
from tests.tokenizer_fixtures import train_tiny_model

transformers = pytest.importorskip("transformers")

TEXTS = [
    "你好 world",
    "  two  spaces\n\n\tdef f(x):\n    return x**2  # 平方 12345\n",
    " leading space",
    "   ",
    "\n",
    "",
    "▁already ▁marked",
    "line1\r\nline2\n\n\n",
    "12345678901234567890 3.14159",
    "so on.  (Thus\n      (an example",  # SentencePiece merges `▁(` before `▁▁`: by score, not by id
    "Ａ全角１２，。！？「」",
    "😀𠀀 ☃ ᚠᛇᚻ ǅ ﬁ a\u0000b é é",
    "<p>hi</p><LF><tab>x<SEP>y 你好，世界。",
    "北京是中国的首都，上海是最大的城市。The quick brown fox jumps over the lazy dog.",
]


def random_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = (list("天地玄黄宇宙洪荒日月盈昃辰宿列张北京上海中国你好世界我们的是")
                + list("abcdefghijklmnopqrstuvwxyzABC0123456789") + [" "] * 8 + ["\n", "\t", "  "]
                + list(".,;:()[]{}<>/=+-*#'\"，。！？、") + ["<p>", "</p>", "😀", "\u0000", "ᚠ", "▁"])
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def assert_transformers_agrees(tok: Tokenizer, directory):
    tok.save_pretrained(directory)
    texts = TEXTS + random_texts(seed=tok.vocab_size, n=300)
    expected = [tok.encode(t) for t in texts]
    for use_fast in (True, False):
        hf = transformers.AutoTokenizer.from_pretrained(directory, use_fast=use_fast)
        assert [hf(t)["input_ids"] for t in texts] == expected, f"use_fast={use_fast}"
        assert [hf(t, add_special_tokens=False)["input_ids"] for t in texts] == [e[1:] for e in expected]
        assert [hf.decode(e, skip_special_tokens=True) for e in expected] == [tok.decode(e) for e in expected]


def test_transformers_encodes_hammerllm_as_trained_without_a_dummy_prefix(hammerllm_dir, tmp_path):
    tok = Tokenizer.from_pretrained(hammerllm_dir / "tokenizer")
    assert tok.encode("你好 world") == [1, 76379, 2028]  # not [1, 262, ...]: no `▁` prefix
    assert_transformers_agrees(tok, tmp_path / "hf")


def test_transformers_encodes_llama2_with_its_dummy_prefix_even_before_a_space(hammerllm_dir, tmp_path):
    tok = Tokenizer.from_pretrained(hammerllm_dir / "reference-tokenizers" / "llama2-7b")
    assert tok.encode(" leading space")[:3] == [1, 29871, 8236]
    assert_transformers_agrees(tok, tmp_path / "hf")


@pytest.mark.parametrize("dummy_prefix", [False, True], ids=["no-dummy-prefix", "dummy-prefix"])
def test_transformers_encodes_tiny_trained_tokenizers_as_hammer(dummy_prefix, tmp_path):
    assert_transformers_agrees(Tokenizer(train_tiny_model(add_dummy_prefix=dummy_prefix)), tmp_path / "hf")


def test_hf_files_keep_eos_and_pad_settings(tmp_path):
    tok = Tokenizer(train_tiny_model(add_dummy_prefix=False))
    tok.save_pretrained(tmp_path / "a")
    config = tmp_path / "a" / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"add_eos_token": false', '"add_eos_token": true'))
    (tmp_path / "a" / "tokenizer.json").unlink()
    with_eos = Tokenizer.from_pretrained(tmp_path / "a")
    with_eos.save_pretrained(tmp_path / "b")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "b")
    assert hf("天地 x")["input_ids"] == with_eos.encode("天地 x") == [1] + tok.encode("天地 x")[1:] + [2]
