"""`hammer data prepare --engine beam`: the local engine's bytes from an Apache Beam pipeline (DirectRunner)."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from hammer.cli import main
from hammer.data import DataError, load_prepared, prepare
from hammer.data.prepare import INDEX_FILE, PROGRESS_FILE
from tests.data_helpers import ByteTokenizer, write_jsonl
from tests.tokenizer_fixtures import write_tiny_tokenizer

pytest.importorskip("apache_beam", reason="needs the beam extra (apache-beam)")

from apache_beam.io.localfilesystem import LocalFileSystem  # noqa: E402

from hammer.data.prepare_beam import WORK_DIR, prepare_on_beam  # noqa: E402

IN_MEMORY = "--direct_running_mode=in_memory"  # Beam's runner in this process: no worker start-up


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def both_engines(tmp_path: Path, tokenizer, inputs, **settings) -> tuple[dict, dict]:
    """Prepares `inputs` with each engine; asserts identical files; returns (index, Beam's counters)."""
    index = prepare(tokenizer, inputs, tmp_path / "local", **settings)
    beam_index, counters = prepare_on_beam(tokenizer, inputs, tmp_path / "beam", workers=2,
                                           pipeline_options=IN_MEMORY, **settings)
    assert beam_index == index
    assert files_of(tmp_path / "beam") == files_of(tmp_path / "local")
    return index, counters


class WideTokenizer(ByteTokenizer):
    """A vocab over 2**16 ids, so shards hold uint32."""

    vocab_size = 70_000
    fingerprint = "wide"

    def encode_batch(self, texts, add_special_tokens=True):
        return [[69_999, *(b + 3 for b in t.encode("utf-8"))] for t in texts]


class FailingTokenizer(ByteTokenizer):
    """Fails on the text "boom" while the file `trap` exists: a crash in the middle of a pipeline."""

    def __init__(self, trap: Path):
        self.trap = trap

    def encode_batch(self, texts, add_special_tokens=True):
        if "boom" in texts and self.trap.exists():
            raise RuntimeError("worker crashed")
        return super().encode_batch(texts, add_special_tokens)


ALIAS = "alias://"


def _local(path: str) -> str:
    return path.removeprefix(ALIAS)


class AliasFileSystem(LocalFileSystem):
    """`alias://PATH` is the local PATH under a scheme of its own, as gs:// is a bucket's: what the
    engine does with a path outside this machine. Beam finds a filesystem by subclass and scheme."""

    @classmethod
    def scheme(cls):
        return "alias"

    def join(self, base, *paths):
        return ALIAS + super().join(_local(base), *paths)

    def split(self, path):
        head, tail = super().split(_local(path))
        return ALIAS + head, tail

    def mkdirs(self, path):
        super().mkdirs(_local(path))

    def match(self, patterns, limits=None):
        return super().match([_local(p) for p in patterns], limits)

    def create(self, path, *args, **kwargs):
        local = Path(_local(path))
        # A full disk for shard 1 while the file `disk-full` lies beside the output (OUT/beam-work/.shard-...).
        if local.name.startswith(".shard-00001") and (local.parents[2] / "disk-full").exists():
            raise OSError(28, "No space left on device", str(local))
        return super().create(str(local), *args, **kwargs)

    def open(self, path, *args, **kwargs):
        return super().open(_local(path), *args, **kwargs)

    def rename(self, sources, destinations):
        super().rename([_local(p) for p in sources], [_local(p) for p in destinations])

    def exists(self, path):
        return super().exists(_local(path))

    def delete(self, paths):
        super().delete([_local(p) for p in paths])


def mixed_inputs(tmp_path: Path) -> list[Path]:
    """txt, jsonl, gzip jsonl and parquet of uneven sizes: blank, whitespace-only and invalid-UTF-8
    documents, CRLF endings, a last line without a newline, lines far longer than a byte range."""
    rng = np.random.default_rng(5)
    words = ["alpha", "数据", "naïve", "x" * 150, "", "  ", "def f():\n    pass"]
    texts = [" ".join(rng.choice(words, size=rng.integers(0, 9))) for _ in range(120)]
    big = write_jsonl(tmp_path / "big.jsonl", texts)
    with open(big, "ab") as f:
        f.write(b'{"text": "bad \\udc80 surrogate"}\n\n{"text": null}\n')
    (tmp_path / "lines.txt").write_bytes(b"first\r\n\xff\xfe broken\n\n   \n" + b"long " * 90 + b"\nno newline at end")
    with gzip.open(tmp_path / "zipped.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in texts[:17]))
    (tmp_path / "tiny.txt").write_text("one line\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts[:50] + [None]}), tmp_path / "rows.parquet", row_group_size=12)
    return [big, tmp_path / "lines.txt", tmp_path / "zipped.jsonl.gz", tmp_path / "tiny.txt",
            tmp_path / "rows.parquet"]


def test_txt_jsonl_gzip_and_parquet_inputs_split_in_byte_ranges_and_row_groups_give_the_local_engines_bytes(
        tmp_path):
    inputs = mixed_inputs(tmp_path)
    # 200-byte ranges: many lines cross a range boundary, and lines of 400+ bytes span whole ranges.
    index = prepare(ByteTokenizer(), inputs, tmp_path / "local", block_size=31, blocks_per_shard=40)
    beam_index, counters = prepare_on_beam(ByteTokenizer(), inputs, tmp_path / "beam", block_size=31,
                                           blocks_per_shard=40, workers=2, pipeline_options=IN_MEMORY,
                                           split_bytes=200)
    assert beam_index == index
    assert files_of(tmp_path / "beam") == files_of(tmp_path / "local")
    assert len(index["shards"]) > 3 and index["dropped_tokens"] > 0
    big, lines, _, _, rows = index["sources"]
    assert big["empty_documents"] > 10 and big["invalid_utf8_documents"] == 1
    assert (lines["documents"], lines["empty_documents"], lines["invalid_utf8_documents"]) == (4, 2, 1)
    assert rows["empty_documents"] > 1  # blank texts and the null row
    assert counters == {"documents": index["documents"], "tokens": index["tokens"], "blocks": index["blocks"],
                        "shards": len(index["shards"]),
                        "empty_documents": sum(s["empty_documents"] for s in index["sources"])}


def test_a_line_longer_than_many_byte_ranges_belongs_to_the_range_where_it_begins(tmp_path):
    data = tmp_path / "in.txt"
    data.write_text("a" * 35 + "\nb\n" + "c" * 9 + "\n" + "d" * 10 + "\n")  # lines start at 0, 36, 38 and 48
    index = prepare(ByteTokenizer(), [data], tmp_path / "local", block_size=3)
    # 1-byte ranges: every range but four begins inside a line; 36: a range begins exactly at line "b".
    for split in (1, 36):
        beam_index, _ = prepare_on_beam(ByteTokenizer(), [data], tmp_path / f"beam-{split}", block_size=3,
                                        pipeline_options=IN_MEMORY, split_bytes=split)
        assert beam_index == index and files_of(tmp_path / f"beam-{split}") == files_of(tmp_path / "local")
    assert index["documents"] == 4 and index["tokens"] == 35 + 1 + 9 + 10 + 4 * 2


def test_inputs_and_output_of_another_filesystem_are_read_and_written_through_beams_filesystems(tmp_path):
    big, lines, _, _, rows = mixed_inputs(tmp_path)
    inputs, output = [ALIAS + str(p) for p in (big, lines, rows)], ALIAS + str(tmp_path / "remote")
    index = prepare(ByteTokenizer(), [big, lines, rows], tmp_path / "local", block_size=31, blocks_per_shard=40)
    remote, _ = prepare_on_beam(ByteTokenizer(), inputs, output, block_size=31, blocks_per_shard=40,
                                pipeline_options=IN_MEMORY, split_bytes=1000)
    shards = [s["file"] for s in index["shards"]]
    assert sorted(files_of(tmp_path / "remote")) == sorted(shards + [INDEX_FILE])
    assert all((tmp_path / "remote" / f).read_bytes() == (tmp_path / "local" / f).read_bytes() for f in shards)
    assert remote["shards"] == index["shards"] and remote["dropped_tokens"] == index["dropped_tokens"]
    counts = ("bytes", "documents", "tokens", "empty_documents", "invalid_utf8_documents")
    assert [s["path"] for s in remote["sources"]] == [ALIAS + s["path"] for s in index["sources"]]
    assert [[s[k] for k in counts] for s in remote["sources"]] == [[s[k] for k in counts] for s in index["sources"]]
    # The finished dataset is found again through the filesystem; a missing input is one line.
    assert prepare_on_beam(ByteTokenizer(), inputs, output, block_size=31, blocks_per_shard=40,
                           pipeline_options=IN_MEMORY) == (remote, {})
    with pytest.raises(DataError, match="input alias://.*nope.jsonl matches 0 files; expected one file"):
        prepare_on_beam(ByteTokenizer(), [ALIAS + str(tmp_path / "nope.jsonl")], ALIAS + str(tmp_path / "x"),
                        block_size=8, pipeline_options=IN_MEMORY)


def test_a_vocab_over_65536_ids_gives_the_same_uint32_shards(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [f"text number {i}" for i in range(40)])
    index, _ = both_engines(tmp_path, WideTokenizer(), [data], block_size=9, blocks_per_shard=4)
    assert index["settings"]["dtype"] == "uint32"


@pytest.mark.slow
def test_two_worker_processes_with_sentencepiece_give_the_local_engines_bytes_and_no_work_files(tmp_path):
    write_tiny_tokenizer(tmp_path / "tok")
    texts = [f"document {i}: the lazy dog 数据 {'x' * (i % 17)}" for i in range(300)]
    data = write_jsonl(tmp_path / "in.jsonl", texts)
    index = prepare(tmp_path / "tok", [data], tmp_path / "local", block_size=64, blocks_per_shard=8, workers=2)
    # Beam's defaults: the DirectRunner with `workers` processes.
    beam_index, counters = prepare_on_beam(tmp_path / "tok", [data], tmp_path / "beam", block_size=64,
                                           blocks_per_shard=8, workers=2, split_bytes=4096)
    assert beam_index == index and files_of(tmp_path / "beam") == files_of(tmp_path / "local")
    assert (counters["documents"], counters["tokens"]) == (300, index["tokens"])
    assert not (tmp_path / "beam" / WORK_DIR).exists() and not (tmp_path / "beam" / PROGRESS_FILE).exists()


def test_the_first_bad_row_stops_the_pipeline_naming_file_and_line_as_the_local_engine_and_leaves_no_output(
        tmp_path):
    good = '{"text": "fine words here"}\n'
    (tmp_path / "bad.jsonl").write_text(good * 30 + '{"text": oops}\n' + good * 5 + '{"content": "x"}\n')
    (tmp_path / "field.jsonl").write_text(good * 12 + '{"content": "x"}\n' + good)
    for name, where in (("bad.jsonl", "bad.jsonl:31 is not JSON"), ("field.jsonl", "field.jsonl:13 has no field")):
        with pytest.raises(DataError) as local:
            prepare(ByteTokenizer(), [tmp_path / name], tmp_path / "local", block_size=4)
        with pytest.raises(DataError) as beam:  # 40-byte ranges: the bad lines lie in later ones
            prepare_on_beam(ByteTokenizer(), [tmp_path / name], tmp_path / "beam", block_size=4,
                            pipeline_options=IN_MEMORY, split_bytes=40)
        assert where in str(local.value) and str(beam.value) == str(local.value)
        assert not (tmp_path / "beam").exists()


def test_the_local_engines_refusals(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ["alpha beta gamma"] * 5)
    b = write_jsonl(tmp_path / "b.jsonl", ["delta epsilon"] * 5)
    run = dict(pipeline_options=IN_MEMORY)
    first, _ = prepare_on_beam(ByteTokenizer(), [a], tmp_path / "out", block_size=8, **run)
    before = files_of(tmp_path / "out")
    assert prepare_on_beam(ByteTokenizer(), [a], tmp_path / "out", block_size=8, **run) == (first, {})
    assert prepare(ByteTokenizer(), [a], tmp_path / "out", block_size=8) == first  # either engine's dataset
    with pytest.raises(DataError, match="already holds a prepared dataset.*sources"):
        prepare_on_beam(ByteTokenizer(), [b], tmp_path / "out", block_size=8, **run)
    with pytest.raises(DataError, match="settings"):
        prepare_on_beam(ByteTokenizer(), [a], tmp_path / "out", block_size=16, **run)
    assert files_of(tmp_path / "out") == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists and is not an unfinished preparation"):
        prepare_on_beam(ByteTokenizer(), [a], tmp_path / "mine", block_size=8, **run)
    assert files_of(tmp_path / "mine") == {"notes.txt": b"keep me"}
    with pytest.raises(DataError, match="inputs give 18 tokens, less than one block of 64"):
        prepare_on_beam(ByteTokenizer(), [write_jsonl(tmp_path / "t.jsonl", ["tiny"] * 3)], tmp_path / "small",
                        block_size=64, **run)
    assert not (tmp_path / "small").exists()
    with pytest.raises(DataError, match="block size must be >= 2"):
        prepare_on_beam(ByteTokenizer(), [a], tmp_path / "x", block_size=1, **run)
    with pytest.raises(FileNotFoundError, match="nope.jsonl not found"):
        prepare_on_beam(ByteTokenizer(), [tmp_path / "nope.jsonl"], tmp_path / "x", block_size=8, **run)
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "doc.txt").write_text("a document a file")
    with pytest.raises(DataError, match="tree \\(text-files, text\\): --engine beam reads .*--engine local"):
        prepare_on_beam(ByteTokenizer(), [tmp_path / "tree"], tmp_path / "x", block_size=8, **run)
    assert not (tmp_path / "x").exists()


def test_a_crashed_pipeline_leaves_no_index_and_the_same_command_completes_it(tmp_path):
    texts = [f"text {i} " * (i % 5) for i in range(60)]
    data = write_jsonl(tmp_path / "in.jsonl", texts[:30] + ["boom"] + texts[30:])
    trap = tmp_path / "trap"
    trap.touch()
    settings = dict(block_size=6, blocks_per_shard=20, split_bytes=300, pipeline_options=IN_MEMORY)
    with pytest.raises(Exception, match="worker crashed"):
        prepare_on_beam(FailingTokenizer(trap), [data], tmp_path / "out", **settings)
    assert not (tmp_path / "out" / INDEX_FILE).exists() and (tmp_path / "out" / PROGRESS_FILE).exists()
    with pytest.raises(DataError, match="unfinished preparation"):
        load_prepared(tmp_path / "out")
    with pytest.raises(DataError, match="unfinished preparation by the beam engine; rerun it with --engine beam"):
        prepare(FailingTokenizer(trap), [data], tmp_path / "out", block_size=6, blocks_per_shard=20)
    trap.unlink()
    index, counters = prepare_on_beam(FailingTokenizer(trap), [data], tmp_path / "out", **settings)
    assert index == prepare(FailingTokenizer(trap), [data], tmp_path / "local", block_size=6, blocks_per_shard=20)
    assert files_of(tmp_path / "out") == files_of(tmp_path / "local")
    assert counters["documents"] <= index["documents"]


def test_a_pipeline_failing_while_writing_shards_is_completed_by_the_rerun_without_tokenizing_again(tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", [f"words and more words {i}" for i in range(80)])
    settings = dict(block_size=16, blocks_per_shard=20, split_bytes=500, pipeline_options=IN_MEMORY)
    (tmp_path / "disk-full").touch()
    with pytest.raises(Exception, match="No space left on device"):
        prepare_on_beam(ByteTokenizer(), [ALIAS + str(data)], ALIAS + str(tmp_path / "out"), **settings)
    assert not (tmp_path / "out" / INDEX_FILE).exists() and (tmp_path / "out" / PROGRESS_FILE).exists()
    (tmp_path / "disk-full").unlink()
    index, counters = prepare_on_beam(ByteTokenizer(), [ALIAS + str(data)], ALIAS + str(tmp_path / "out"),
                                      **settings)
    local = prepare(ByteTokenizer(), [data], tmp_path / "local", block_size=16, blocks_per_shard=20)
    assert len(local["shards"]) == 7 and index["shards"] == local["shards"]
    assert files_of(tmp_path / "out") == {f: b for f, b in files_of(tmp_path / "local").items() if f != INDEX_FILE} \
        | {INDEX_FILE: (tmp_path / "out" / INDEX_FILE).read_bytes()}
    assert counters.get("documents", 0) == 0 and 1 <= counters["shards"] <= 7  # every item was tokenized before


def test_hammer_data_prepare_engine_beam_prints_beams_counters(tmp_path, capsys):
    write_tiny_tokenizer(tmp_path / "tok")
    data = write_jsonl(tmp_path / "in.jsonl", [f"the lazy dog {i}" for i in range(50)])
    common = ["data", "prepare", "--tokenizer", str(tmp_path / "tok"), "--input", str(data), "--block-size", "16",
              "--quiet"]
    assert main(common + ["--output", str(tmp_path / "beam"), "--engine", "beam", "--workers", "2",
                          f"--pipeline-options={IN_MEMORY} --direct_num_workers=1"]) == 0
    out = capsys.readouterr().out.splitlines()
    index = json.loads((tmp_path / "beam" / INDEX_FILE).read_text())
    assert out[0].startswith(f"{tmp_path / 'beam'}: {index['blocks']} blocks of 16 tokens")
    assert out[1] == (f"beam counters: blocks {index['blocks']}, documents 50, empty_documents 0, "
                      f"shards 1, tokens {index['tokens']}")
    assert main(common + ["--output", str(tmp_path / "local")]) == 0
    assert files_of(tmp_path / "local") == files_of(tmp_path / "beam")
    assert main(common + ["--output", str(tmp_path / "x"), "--pipeline-options=--runner=DirectRunner"]) == 2
    assert "--pipeline-options '--runner=DirectRunner' needs --engine beam" in capsys.readouterr().err
