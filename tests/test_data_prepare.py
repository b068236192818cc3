"""Sources, block packing and `hammer data prepare`: what lands in the shards and what is refused."""
from __future__ import annotations

import errno
import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from hammer.cli import main
from hammer.data import DataError, load_prepared, open_source, pack, prepare
from hammer.data.prepare import INDEX_FILE, PROGRESS_FILE, token_dtype
from hammer.tokenizer import Tokenizer
from tests.data_helpers import BOS, EOS, ByteTokenizer, ids, write_jsonl
from tests.tokenizer_fixtures import write_tiny_tokenizer


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok") / "tiny-sp"
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def sp_tokenizer(sp_dir):
    return Tokenizer.from_pretrained(sp_dir)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_each_document_is_wrapped_in_bos_and_eos_and_blocks_are_consecutive_cuts_of_the_stream():
    docs = [[10, 11, 12], [20], [30, 31]]
    blocks, carry = pack(docs, block_size=4, bos_id=1, eos_id=2)
    assert blocks.tolist() == [[1, 10, 11, 12], [2, 1, 20, 2], [1, 30, 31, 2]]
    assert carry.tolist() == []
    blocks, carry = pack(docs, block_size=5, bos_id=1, eos_id=2)
    assert blocks.tolist() == [[1, 10, 11, 12, 2], [1, 20, 2, 1, 30]]
    assert carry.tolist() == [31, 2]


def test_packing_piece_by_piece_through_the_carry_equals_packing_in_one_go():
    rng = np.random.default_rng(7)
    docs = [rng.integers(3, 100, size=rng.integers(0, 23)).tolist() for _ in range(41)]
    whole, whole_carry = pack(docs, 11, BOS, EOS)
    pieces, carry = [], ()
    for doc in docs:
        blocks, carry = pack([doc], 11, BOS, EOS, carry)
        pieces.append(blocks)
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    np.testing.assert_array_equal(carry, whole_carry)


def test_prepare_writes_blocks_in_input_order_and_drops_the_tail_shorter_than_a_block(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", ["ab", "cde", "", "f", "gh"])
    index = prepare(ByteTokenizer(), [data], tmp_path / "out", block_size=5)
    stream = [BOS, *ids("ab"), EOS, BOS, *ids("cde"), EOS, BOS, *ids("f"), EOS, BOS, *ids("gh"), EOS]
    ds = load_prepared(tmp_path / "out")
    assert len(ds) == 3 and len(stream) == 16
    assert [ds[i].tolist() for i in range(3)] == [stream[0:5], stream[5:10], stream[10:15]]
    assert ds[-1].tolist() == stream[10:15]
    assert ds.metadata == index
    assert (index["documents"], index["tokens"], index["blocks"], index["dropped_tokens"]) == (4, 16, 3, 1)
    assert index["sources"][0]["empty_documents"] == 1
    assert index["settings"]["dtype"] == "uint16"
    assert not (tmp_path / "out" / PROGRESS_FILE).exists()


def test_invalid_utf8_is_replaced_and_counted_and_blank_documents_are_skipped_and_counted(tmp_path):
    data = tmp_path / "in.txt"
    data.write_bytes(b"ok\n\xff\xfebad\n\n   \nfine\xef\xbf\xbd\r\n")
    index = prepare(ByteTokenizer(), [data], tmp_path / "out", block_size=3)
    counts = index["sources"][0]
    assert counts["documents"] == 3 and counts["empty_documents"] == 2
    # The genuine U+FFFD in "fine\ufffd" is text, not a replacement.
    assert counts["invalid_utf8_documents"] == 1 and counts["replaced_sequences"] == 2
    ds = load_prepared(tmp_path / "out")
    stream = np.concatenate([ds[i] for i in range(len(ds))]).tolist()
    expected = [BOS, *ids("ok"), EOS, BOS, *ids("\ufffd\ufffdbad"), EOS, BOS, *ids("fine\ufffd"), EOS]
    assert stream == expected[: len(stream)] and index["dropped_tokens"] == len(expected) - len(stream)


def test_prepare_with_sentencepiece_packs_its_encoding_and_is_byte_identical_with_two_workers(
        tmp_path, sp_dir, sp_tokenizer):
    texts = [f"document {i}: the lazy dog 数据 {'x' * (i % 17)}" for i in range(300)]
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    prepare(sp_dir, [data], tmp_path / "one", block_size=64, blocks_per_shard=8)
    prepare(sp_tokenizer, [data], tmp_path / "two", block_size=64, blocks_per_shard=8, workers=2)
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")
    ds = load_prepared(tmp_path / "one", tokenizer=sp_tokenizer)
    stream = np.concatenate([[sp_tokenizer.bos_id, *sp_tokenizer.encode(t, add_special_tokens=False),
                              sp_tokenizer.eos_id] for t in texts])
    packed = np.concatenate([ds[i] for i in range(len(ds))])
    np.testing.assert_array_equal(packed, stream[: len(packed)])
    assert len(ds) == len(stream) // 64 and len(ds.metadata["shards"]) == -(-len(ds) // 8)


def _fail_shard(number: int):
    """An `open` opener that sends shard `number` to /dev/full, where every write fails with ENOSPC."""
    def opener(path, flags):
        if Path(path).name.startswith(f"shard-{number:05d}"):
            return os.open("/dev/full", os.O_WRONLY)
        return os.open(path, flags, 0o666)
    return opener


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to simulate a full disk")
def test_a_full_disk_leaves_no_index_and_the_rerun_resumes_to_byte_identical_output(tmp_path):
    rng = np.random.default_rng(3)
    texts = ["".join(chr(97 + c) for c in rng.integers(0, 26, size=rng.integers(0, 30))) for _ in range(40)]
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    settings = dict(block_size=7, blocks_per_shard=16)
    clean = prepare(ByteTokenizer(), [data], tmp_path / "clean", **settings)
    offsets = set()
    for failing in range(len(clean["shards"])):
        out = tmp_path / f"failed-at-{failing}"
        with pytest.raises(OSError) as e:
            prepare(ByteTokenizer(), [data], out, opener=_fail_shard(failing), **settings)
        assert e.value.errno == errno.ENOSPC
        assert not (out / INDEX_FILE).exists()
        assert sorted(p.name for p in out.iterdir()) == [PROGRESS_FILE] + [f"shard-{k:05d}.bin" for k in range(failing)]
        with pytest.raises(DataError, match="unfinished preparation"):
            load_prepared(out)
        offsets.add(json.loads((out / PROGRESS_FILE).read_text())["resume"]["offset"])
        assert prepare(ByteTokenizer(), [data], out, **settings) == clean
        assert files_of(out) == files_of(tmp_path / "clean")
    assert max(offsets) > 0, "some shard boundary should fall inside a document"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to simulate a full disk")
def test_an_unfinished_run_is_not_resumed_over_changed_inputs(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", ["some words"] * 30)
    with pytest.raises(OSError):
        prepare(ByteTokenizer(), [data], tmp_path / "out", block_size=8, blocks_per_shard=4, opener=_fail_shard(1))
    write_jsonl(data, ["other words"] * 30)
    with pytest.raises(DataError, match="unfinished preparation of other inputs or settings \\(sources differ\\)"):
        prepare(ByteTokenizer(), [data], tmp_path / "out", block_size=8, blocks_per_shard=4)


def test_an_output_holding_another_dataset_or_other_files_is_refused_and_the_same_dataset_is_kept(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["alpha beta gamma"] * 5)
    b = write_jsonl(tmp_path / "b.jsonl", ["delta epsilon"] * 5)
    first = prepare(ByteTokenizer(), [a], tmp_path / "out", block_size=8)
    before = files_of(tmp_path / "out")
    assert prepare(ByteTokenizer(), [a], tmp_path / "out", block_size=8) == first
    with pytest.raises(DataError, match="already holds a prepared dataset.*sources"):
        prepare(ByteTokenizer(), [b], tmp_path / "out", block_size=8)
    with pytest.raises(DataError, match="settings"):
        prepare(ByteTokenizer(), [a], tmp_path / "out", block_size=16)
    assert files_of(tmp_path / "out") == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists and is not an unfinished preparation"):
        prepare(ByteTokenizer(), [a], tmp_path / "mine", block_size=8)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_inputs_too_small_for_one_block_are_an_error_that_leaves_no_output(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", ["tiny"])
    with pytest.raises(DataError, match="less than one block of 64"):
        prepare(ByteTokenizer(), [data], tmp_path / "out", block_size=64)
    assert not (tmp_path / "out").exists()


def test_load_refuses_another_tokenizer_naming_both_fingerprints(tmp_path, sp_tokenizer):
    data = write_jsonl(tmp_path / "in.jsonl", ["some text to pack"] * 10)
    prepare(ByteTokenizer(), [data], tmp_path / "out", block_size=8)
    with pytest.raises(DataError) as e:
        load_prepared(tmp_path / "out", tokenizer=sp_tokenizer)
    assert ByteTokenizer.fingerprint in str(e.value) and sp_tokenizer.fingerprint in str(e.value)
    assert len(load_prepared(tmp_path / "out", tokenizer=ByteTokenizer.fingerprint)) > 0


def test_load_refuses_a_missing_or_truncated_shard(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", ["some text to pack"] * 20)
    prepare(ByteTokenizer(), [data], tmp_path / "out", block_size=8, blocks_per_shard=4)
    shard = tmp_path / "out" / "shard-00001.bin"
    content = shard.read_bytes()
    shard.write_bytes(content[:-3])
    with pytest.raises(DataError, match=f"{len(content) - 3} bytes, the index says {len(content)}.*cut short"):
        load_prepared(tmp_path / "out")
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.bin .*missing"):
        load_prepared(tmp_path / "out")
    shard.write_bytes(content[:8] + bytes([content[8] ^ 1]) + content[9:])
    with pytest.raises(DataError, match="sha256"):
        load_prepared(tmp_path / "out").verify_checksums()


def test_unknown_formats_missing_fields_and_bad_json_are_clear_errors(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="unknown input format for .*data.csv"):
        open_source(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError, match="nope.jsonl not found"):
        open_source(tmp_path / "nope.jsonl")
    data = write_jsonl(tmp_path / "in.jsonl", ["a", "b"], field="content")
    with pytest.raises(DataError, match=r"in.jsonl:1 has no field 'text' \(found \['content', 'id'\]\)"):
        prepare(ByteTokenizer(), [data], tmp_path / "out", block_size=2)
    assert prepare(ByteTokenizer(), [data], tmp_path / "ok", block_size=2, text_field="content")["documents"] == 2
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(DataError, match="bad.jsonl:2 is not JSON"):
        prepare(ByteTokenizer(), [tmp_path / "bad.jsonl"], tmp_path / "bad-out", block_size=2)
    # Bad input leaves no output behind, so the corrected rerun starts afresh.
    assert not (tmp_path / "out").exists() and not (tmp_path / "bad-out").exists()
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "mended"}\n')
    assert prepare(ByteTokenizer(), [tmp_path / "bad.jsonl"], tmp_path / "bad-out", block_size=2)["documents"] == 2


def _has_tfds() -> bool:
    try:
        import tensorflow_datasets  # noqa: F401
        return True
    except ImportError:
        return False


def test_tfds_input_without_the_tfds_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # how Python spells "not installed"
    with pytest.raises(DataError, match=r"hammerllm\[tfds\]"):
        open_source("tfds:wikipedia/20230601.en:train")


def test_engine_beam_without_the_beam_extra_says_how_to_install_it(tmp_path, monkeypatch):
    from hammer.data.prepare_beam import prepare_on_beam

    monkeypatch.setitem(sys.modules, "apache_beam", None)  # how Python spells "not installed"
    data = write_jsonl(tmp_path / "in.jsonl", ["some text"])
    with pytest.raises(DataError, match=r"--engine beam needs Apache Beam: pip install 'hammerllm\[beam\]'"):
        prepare_on_beam(ByteTokenizer(), [data], tmp_path / "out", block_size=4)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not _has_tfds(), reason="needs the tfds extra (tensorflow-datasets, array-record)")
def test_a_local_tfds_array_record_dataset_is_read_through_data_source(tmp_path):
    import tensorflow_datasets as tfds

    class HammerTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"body": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(["hello", "", "数据"])}

        def _generate_examples(self, texts):
            for i, text in enumerate(texts):
                yield i, {"body": text}

    HammerTinyText(data_dir=str(tmp_path / "tfds"), file_format="array_record").download_and_prepare()
    index = prepare(ByteTokenizer(), ["tfds:hammer_tiny_text:train"], tmp_path / "out", block_size=3,
                    text_field="body", tfds_data_dir=str(tmp_path / "tfds"))
    assert (index["documents"], index["sources"][0]["empty_documents"]) == (2, 1)
    ds = load_prepared(tmp_path / "out")
    stream = np.concatenate([ds[i] for i in range(len(ds))]).tolist()
    assert stream == [BOS, *ids("hello"), EOS, BOS, *ids("数据"), EOS][: len(stream)]


def test_a_directory_gives_a_document_per_file_gzip_is_read_and_parquet_gives_a_text_column(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    tree = tmp_path / "tree"
    (tree / "pkg").mkdir(parents=True)
    (tree / "b.py").write_text("bee\nline")
    (tree / "pkg" / "a.py").write_text("ay")
    (tree / ".hidden").write_text("never")
    index = prepare(ByteTokenizer(), [tree], tmp_path / "out", block_size=2)
    ds = load_prepared(tmp_path / "out")
    stream = np.concatenate([ds[i] for i in range(len(ds))]).tolist()
    assert stream == [BOS, *ids("bee\nline"), EOS, BOS, *ids("ay"), EOS]
    assert index["documents"] == 2
    with gzip.open(tmp_path / "z.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped"}\n')
    index = prepare(ByteTokenizer(), [tmp_path / "z.jsonl.gz"], tmp_path / "gz", block_size=8)
    assert load_prepared(tmp_path / "gz")[0].tolist() == [BOS, *ids("zipped"), EOS]
    pq.write_table(pa.table({"body": ["one", None, "three"]}), tmp_path / "t.parquet")
    index = prepare(ByteTokenizer(), [tmp_path / "t.parquet"], tmp_path / "pq", block_size=3, text_field="body")
    assert (index["documents"], index["sources"][0]["empty_documents"], index["tokens"]) == (2, 1, 5 + 7)


def test_hf_save_to_disk_text_and_ready_input_ids_blocks_used_as_is(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["hello", "world"]}).save_to_disk(str(tmp_path / "hf-text"))
    prepare(ByteTokenizer(), [tmp_path / "hf-text"], tmp_path / "text-out", block_size=7)
    assert load_prepared(tmp_path / "text-out")[0].tolist() == [BOS, *ids("hello"), EOS]
    rows = np.arange(3 * 6).reshape(3, 6) % 250 + 3
    datasets.Dataset.from_dict({"input_ids": rows.tolist()}).save_to_disk(str(tmp_path / "hf-ids"))
    index = prepare(ByteTokenizer(), [tmp_path / "hf-ids"], tmp_path / "ids-out", block_size=6, blocks_per_shard=2)
    ds = load_prepared(tmp_path / "ids-out")
    np.testing.assert_array_equal(np.stack([ds[i] for i in range(len(ds))]), rows)
    assert index["sources"][0]["kind"] == "tokens" and index["dropped_tokens"] == 0
    with pytest.raises(DataError, match="row 0 has 6 ids; ready blocks must match --block-size 5"):
        prepare(ByteTokenizer(), [tmp_path / "hf-ids"], tmp_path / "bad", block_size=5)
    with pytest.raises(DataError, match="mix text with ready token blocks"):
        prepare(ByteTokenizer(), [tmp_path / "hf-text", tmp_path / "hf-ids"], tmp_path / "mixed", block_size=6)


def test_a_vocab_over_65536_ids_is_stored_as_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32

    class Wide(ByteTokenizer):
        vocab_size = 70_000
        fingerprint = "wide"

        def encode_batch(self, texts, add_special_tokens=True):
            return [[69_999, *ids(t)] for t in texts]

    data = write_jsonl(tmp_path / "in.jsonl", ["abc"] * 4)
    index = prepare(Wide(), [data], tmp_path / "out", block_size=6)
    ds = load_prepared(tmp_path / "out")
    assert index["settings"]["dtype"] == "uint32" and index["shards"][0]["bytes"] == len(ds) * 6 * 4
    assert ds[0].tolist() == [BOS, 69_999, *ids("abc"), EOS]


def test_hammer_data_prepare_with_hammerllms_tokenizer_writes_uint32_blocks_of_2048_by_default(
        tmp_path, hammerllm_dir):
    texts = [f"第{i}篇：北京是中国的首都。The quick brown fox {i}.\n    def f(x): return x * {i}" for i in range(200)]
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    assert main(["data", "prepare", "--tokenizer", str(hammerllm_dir / "tokenizer"), "--input", str(data),
                 "--output", str(tmp_path / "out"), "--quiet"]) == 0
    tok = Tokenizer.from_pretrained(hammerllm_dir / "tokenizer")
    ds = load_prepared(tmp_path / "out", tokenizer=tok)
    stream = [i for t in texts for i in [1, *tok.encode(t, add_special_tokens=False), 2]]
    assert (ds.block_size, ds.dtype, tok.vocab_size) == (2048, np.dtype("<u4"), 105789)
    assert len(ds) == len(stream) // 2048 >= 2
    assert np.concatenate([ds[i] for i in range(len(ds))]).tolist() == stream[: len(ds) * 2048]
    assert ds.metadata["dropped_tokens"] == len(stream) % 2048
