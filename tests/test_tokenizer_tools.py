"""`hammer tokenizer train | merge | coverage | compression`, on HammerLLM's files and tiny corpora."""
import json

import pytest
from sentencepiece import sentencepiece_model_pb2

from hammer.cli import main
from hammer.documents import read_documents
from hammer.tokenizer import Tokenizer
from tests.tokenizer_fixtures import CORPUS, train_tiny_model

HAMMERLLM_RATIO = 0.9388603563642239


def run_json(capsys, *argv) -> dict:
    assert main(["tokenizer", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_error(capsys, *argv) -> str:
    """Runs a command that must fail; returns its one-line error."""
    assert main(["tokenizer", *map(str, argv)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hammer tokenizer: error:")]
    assert len(err) == 1
    return err[0]


def pieces(path):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    return [(p.piece, p.score, p.type) for p in proto.pieces]


def test_merge_reproduces_hammerllm_at_every_index_but_the_two_misspelt_symbols(hammerllm_dir, tmp_path, capsys):
    refs = hammerllm_dir / "reference-tokenizers"
    summary = run_json(capsys, "merge", "--base", refs / "internlm-7b", "--second", refs / "llama_zh_1b/tokenizer.model",
                       "--symbols", hammerllm_dir / "charsets/user_defined_symbol_file.txt", "--output", tmp_path / "m")
    assert summary["ratio"] == HAMMERLLM_RATIO
    assert (summary["base_pieces"], summary["added_chars"], summary["pieces"]) == (103168, 2536, 105789)
    merged, released = pieces(tmp_path / "m/tokenizer.model"), pieces(hammerllm_dir / "tokenizer/tokenizer.model")
    assert len(merged) == len(released) == 105789
    assert [i for i, (a, b) in enumerate(zip(merged, released)) if a != b] == [105705, 105722]
    assert (merged[105705][0], released[105705][0], merged[105722][0], released[105722][0]) == (
        "CLS>", "<CLS>", "</p >", "</p>")


def test_merge_with_a_given_ratio_scales_the_second_models_scores(hammerllm_dir, tmp_path, capsys):
    refs = hammerllm_dir / "reference-tokenizers"
    run_json(capsys, "merge", "--base", refs / "internlm-7b", "--second", refs / "llama_zh_1b",
             "--ratio", 0.5, "--output", tmp_path / "m")
    merged, second = pieces(tmp_path / "m/tokenizer.model"), dict((p, s) for p, s, _ in pieces(refs / "llama_zh_1b/tokenizer.model"))
    assert len(merged) == 103168 + 2536
    char, score, _ = merged[103168]
    assert score == pytest.approx(second[char] * 0.5, rel=1e-6)


def test_coverage_of_hammerllm_and_llama2_by_level(hammerllm_dir, capsys):
    def percents(path):
        return [row["percent"] for row in run_json(capsys, "coverage", path)["coverage"]]
    assert percents(hammerllm_dir / "tokenizer") == [100.0, 100.0, 100.0]
    assert percents(hammerllm_dir / "reference-tokenizers/llama2-7b") == [17.29, 0.13, 0.0]
    # HammerLLM's own charsets file gives the same three levels first.
    rows = run_json(capsys, "coverage", hammerllm_dir / "reference-tokenizers/llama2-7b",
                    "--charset", hammerllm_dir / "charsets/charsets_char.json")["coverage"]
    assert [(r["covered"], r["total"]) for r in rows[:3]] == [(605, 3500), (4, 3000), (0, 1605)]


def test_compression_counts_bytes_and_tokens_and_compares_with_a_base(tmp_path, capsys):
    tok, base = Tokenizer(train_tiny_model(add_dummy_prefix=False)), Tokenizer(train_tiny_model(add_dummy_prefix=True))
    tok.save_pretrained(tmp_path / "tok")
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "a.txt").write_text("天地玄黄\n\nhello world  42\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "def f():\n    return 1"}) + "\n\n", encoding="utf-8")
    rows = run_json(capsys, "compression", tmp_path / "tok", "--data", tmp_path / "a.txt", tmp_path / "b.jsonl",
                    "--base", tmp_path / "base")["files"]
    docs = [["天地玄黄", "hello world  42"], ["def f():\n    return 1"]]  # a .txt line is a document
    for row, file_docs in zip(rows, docs):
        tokens = sum(len(tok.encode(d, add_special_tokens=False)) for d in file_docs)
        base_tokens = sum(len(base.encode(d, add_special_tokens=False)) for d in file_docs)
        assert (row["bytes"], row["tokens"], row["base_tokens"]) == (
            sum(len(d.encode()) for d in file_docs), tokens, base_tokens)
        assert row["compared"] == round(tokens / base_tokens, 4)
    overall = rows[-1]
    assert overall["file"] == "overall" and overall["tokens"] == rows[0]["tokens"] + rows[1]["tokens"]
    assert overall["bytes_per_token"] == round(overall["bytes"] / overall["tokens"], 4)


def test_corpus_files_split_into_documents_on_line_ends_only(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 raw inside a string; str.splitlines() would cut there.
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes("x\u2028y\x0cz\r\nw\n".encode())
    assert read_documents(tmp_path / "a.jsonl") == ["a\u2028b\x85c"]
    assert read_documents(tmp_path / "b.txt") == ["x\u2028y\x0cz", "w"]


def test_train_writes_a_llama_format_directory_with_the_asked_pieces(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("\n".join(CORPUS[:6]), encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in CORPUS[6:]), encoding="utf-8")
    (tmp_path / "symbols.txt").write_text("<p>\n</p>\n", encoding="utf-8")
    (tmp_path / "chars.txt").write_text("鑫\n淼\n", encoding="utf-8")
    summary = run_json(capsys, "train", "--input", tmp_path / "a.txt", tmp_path / "b.jsonl", "--vocab-size", 431,
                       "--user-defined-symbols", tmp_path / "symbols.txt", "--required-chars", tmp_path / "chars.txt",
                       "--output", tmp_path / "tok")
    tok = Tokenizer.from_pretrained(tmp_path / "tok")
    assert summary["vocab_size"] == tok.vocab_size == 431 and summary["fingerprint"] == tok.fingerprint
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert tok.encode("鑫<p>淼", add_special_tokens=False) == [tok.piece_to_id(p) for p in ("鑫", "<p>", "淼")]
    assert tok.id_to_piece(tok.encode("天地", add_special_tokens=False)[0]) != "▁"  # no dummy prefix
    assert tok.encode("  a") != tok.encode(" a")  # runs of spaces are kept
    assert [tok.id_to_piece(i) for i in tok.encode("2024", add_special_tokens=False)] == list("2024")


@pytest.fixture
def tiny_dir(tmp_path):
    Tokenizer(train_tiny_model(add_dummy_prefix=False)).save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, tiny_dir, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n\n  \n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("<p>\ncafé\n".encode("latin-1"))
    (tmp_path / "words.txt").write_text("天\n天地\n", encoding="utf-8")
    (tmp_path / "junk.model").write_bytes(b"\x00\x01 not sentencepiece")
    out = tmp_path / "out"
    train = ["train", "--vocab-size", 499, "--output", out]
    assert "not found" in run_error(capsys, "coverage", tmp_path / "absent")
    assert "not a SentencePiece model" in run_error(capsys, "coverage", tmp_path / "junk.model")
    assert "empty.txt holds no documents" in run_error(capsys, *train, "--input", tmp_path / "empty.txt")
    assert "not found" in run_error(capsys, *train, "--input", tmp_path / "absent.txt")
    assert "not UTF-8" in run_error(capsys, *train, "--input", corpus, "--user-defined-symbols", tmp_path / "latin1.txt")
    assert "not single characters" in run_error(capsys, *train, "--input", corpus, "--required-chars", tmp_path / "words.txt")
    assert "smaller than required_chars" in run_error(capsys, "train", "--vocab-size", 300, "--output", out, "--input", corpus)
    assert "not UTF-8" in run_error(capsys, "merge", "--base", tiny_dir, "--second", tiny_dir, "--ratio", 1,
                                    "--symbols", tmp_path / "latin1.txt", "--output", out)
    assert "not single characters" in run_error(capsys, "merge", "--base", tiny_dir, "--second", tiny_dir,
                                                "--chars", tmp_path / "words.txt", "--output", out)
    (tmp_path / "rare.txt").write_text("鑫\n", encoding="utf-8")
    assert "in neither model" in run_error(capsys, "merge", "--base", tiny_dir, "--second", tiny_dir, "--ratio", 1,
                                           "--chars", tmp_path / "rare.txt", "--output", out)
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial directories left
    out.mkdir()
    assert "already exists" in run_error(capsys, *train, "--input", corpus)
