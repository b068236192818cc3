import hashlib
import pickle

import pytest
import sentencepiece as spm

from hammer.tokenizer import Tokenizer, TokenizerError
from tests.tokenizer_fixtures import train_tiny_model

MIXED = [
    "你好 world",
    "  two  spaces\n\n\tdef f(x):\n    return x**2  # 平方 12345\n",
    " leading space and trailing  ",
    "😀𠀀 ☃ outside the vocabulary: \u0000 ᚠᛇᚻ",
    "",
]


@pytest.fixture(scope="module")
def hammerllm(hammerllm_dir):
    return Tokenizer.from_pretrained(hammerllm_dir / "tokenizer")


@pytest.fixture(scope="module", params=[False, True], ids=["no-dummy-prefix", "dummy-prefix"])
def tiny(request):
    return Tokenizer(train_tiny_model(add_dummy_prefix=request.param))


def test_hammerllm_encodes_as_its_sentencepiece_model_after_bos(hammerllm, hammerllm_dir):
    sp = spm.SentencePieceProcessor(model_file=str(hammerllm_dir / "tokenizer" / "tokenizer.model"))
    assert hammerllm.encode("你好 world") == [1, 76379, 2028]
    for text in MIXED:
        assert hammerllm.encode(text) == [1] + sp.encode(text)
        assert hammerllm.encode(text, add_special_tokens=False) == sp.encode(text)


def test_hammerllm_special_ids_and_size(hammerllm):
    assert (hammerllm.vocab_size, hammerllm.bos_id, hammerllm.eos_id, hammerllm.pad_id) == (105789, 1, 2, None)


def test_special_token_strings_in_text_are_plain_text_unless_asked(hammerllm, hammerllm_dir):
    text = "a<s>b</s>c"
    plain = hammerllm.encode(text, add_special_tokens=False)
    assert 1 not in plain and 2 not in plain
    parsing = Tokenizer.from_pretrained(hammerllm_dir / "tokenizer", parse_special_tokens=True)
    sp = hammerllm.sp
    assert parsing.encode(text) == [1] + sp.encode("a") + [1] + sp.encode("b") + [2] + sp.encode("c")
    assert parsing.encode_batch([text, "x"]) == [parsing.encode(text), parsing.encode("x")]


def test_eos_is_appended_when_the_config_says_so(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "t")
    config = tmp_path / "t" / "tokenizer_config.json"
    config.write_text(config.read_text().replace('"add_eos_token": false', '"add_eos_token": true'))
    tok = Tokenizer.from_pretrained(tmp_path / "t")
    assert tok.encode("天地") == [1] + tiny.encode("天地", add_special_tokens=False) + [2]


def test_encode_batch_equals_encode_for_any_worker_count(tiny):
    texts = MIXED * 7
    expected = [tiny.encode(t) for t in texts]
    assert tiny.encode_batch(texts) == expected
    assert tiny.encode_batch(texts, num_workers=2) == expected
    assert tiny.encode_batch(texts, add_special_tokens=False) == [e[1:] for e in expected]


def test_decode_inverts_encode_and_drops_control_ids(tiny):
    for text in MIXED[:3]:
        assert tiny.decode(tiny.encode(text)) == text


def test_fingerprint_is_the_sha256_of_the_model_file(hammerllm, hammerllm_dir, tiny):
    data = (hammerllm_dir / "tokenizer" / "tokenizer.model").read_bytes()
    assert hammerllm.fingerprint == hashlib.sha256(data).hexdigest()
    assert Tokenizer.from_pretrained(hammerllm_dir / "tokenizer" / "tokenizer.model").fingerprint == hammerllm.fingerprint
    assert tiny.fingerprint != hammerllm.fingerprint


def test_tokenizer_survives_pickling_for_worker_processes(tiny):
    clone = pickle.loads(pickle.dumps(tiny))
    assert clone.encode(MIXED[1]) == tiny.encode(MIXED[1]) and clone.fingerprint == tiny.fingerprint


def test_save_pretrained_round_trips_and_never_overwrites(tmp_path, tiny):
    tiny.save_pretrained(tmp_path / "tok")
    again = Tokenizer.from_pretrained(tmp_path / "tok")
    assert again.fingerprint == tiny.fingerprint
    assert [again.encode(t) for t in MIXED] == [tiny.encode(t) for t in MIXED]
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        tiny.save_pretrained(tmp_path / "tok")


def test_missing_or_non_sentencepiece_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "junk.model").write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(TokenizerError, match="junk.model is not a SentencePiece model: its 24 bytes do not parse") as e:
        Tokenizer.from_pretrained(tmp_path / "junk.model")
    assert ".cc(" not in str(e.value)  # SentencePiece's source location is no help to a user


def test_a_pad_token_outside_the_model_gives_no_pad_id(hammerllm_dir):
    tok = Tokenizer.from_pretrained(hammerllm_dir / "reference-tokenizers" / "llama_zh_1b")
    assert (tok.special.pad_token, tok.pad_id, tok.bos_id) == ("<pad>", None, 1)
