"""`hammer data prepare --engine beam`: the local engine's dataset, prepared by an Apache Beam pipeline.

The same inputs, tokenizer, block size and shard size give the same bytes as `prepare`
(hammer/data/prepare.py): the same shards and the same index, so a dataset's fingerprint does not
depend on the engine. Beam's own flags choose where it runs (`--runner=DataflowRunner ...`,
`FlinkRunner`, `SparkRunner`); without them it runs on the DirectRunner with `workers` processes.
Every file is read and written through Beam's filesystems (local paths, gs://, s3://, hdfs:// where
Beam's matching extra is installed).

Work items: a .txt or .jsonl file is cut into byte ranges of `split_bytes` (a line belongs to the
range that holds its first byte), a .parquet file into its row groups; a gzip file is one item
(gzip cannot be entered midway). One pipeline, two passes over them:
  1. tokenize: each item's documents become [BOS] + ids + [EOS], written in the dataset's dtype to
     work/ITEM.bin, with a summary (its counts) in work/ITEM.json;
  2. cut: once every summary is in, their prefix sums place each item in the global token stream;
     each shard is the concatenation of slices of the item files, copied in parallel into its
     shard-NNNNN.bin, with a record (blocks, bytes, sha256) in work/.
The driver then writes index.json, last and atomically, and removes work/ and progress.json.

Bad input (a row without the text field, a line that is not JSON) stops the pipeline; the worker
that met it leaves the local engine's one-line error (file and line) in work/, which the driver
raises after removing everything the run wrote. Any other failure keeps progress.json and work/:
every file is written under a temporary name and renamed into place, and an item or a shard whose
summary or record is there is not redone, so rerunning the same command completes the dataset.

This module imports Beam only when it runs, so the rest of hammer works without the `beam` extra.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import itertools
import json
import os
import shlex
import uuid
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from hammer.data.prepare import (INDEX_FILE, PROGRESS_FILE, build_index, check_settings, claim,
                                 count_document, dataset_key, encode_chunk, index_text, load_tokenizer,
                                 new_counts, shard_name)
from hammer.data.sources import (DataError, RowError, Source, at_row, column_texts, json_text, open_source,
                                 text_line)

DEFAULT_SPLIT_BYTES = 64 * 2**20
WORK_DIR = "beam-work"
_FORMATS = ("text-lines", "jsonl", "parquet")
_CHUNK_DOCS = 256  # documents tokenized in one call, as the local engine's worker tasks
_COPY_BYTES = 2**24  # shard bytes copied per read
_METRICS = "hammer"


@dataclass(frozen=True)
class WorkItem:
    """A piece of one input that one worker tokenizes: a byte range, a row group or a whole file."""

    source: int  # the input's place in the command line
    number: int  # the item's place within its input
    path: str
    format: str
    text_field: str
    start: int = 0  # byte range [start, end) of a txt or jsonl file; end < 0: the whole file
    end: int = -1
    row_group: int = -1

    @property
    def name(self) -> str:
        return f"item-{self.source:05d}-{self.number:07d}"


def prepare_on_beam(tokenizer, inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                    block_size: int, text_field: str = "text", workers: int = 1,
                    blocks_per_shard: int | None = None, pipeline_options: Sequence[str] | str = (),
                    split_bytes: int = DEFAULT_SPLIT_BYTES) -> tuple[dict, dict]:
    """Prepares `inputs` into `output` with a Beam pipeline; returns (its index, Beam's counters).

    `pipeline_options` are Beam's flags (a list, or one string split as a shell would); they come
    after the defaults (DirectRunner, `workers` processes), so they override them. The counters
    are this run's work (documents, tokens, shards, blocks); empty when `output` was already done.
    """
    try:
        import apache_beam as beam
        from apache_beam.io.filesystems import FileSystems
        from apache_beam.metrics.metric import MetricsFilter
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise DataError("--engine beam needs Apache Beam: pip install 'hammerllm[beam]'") from None
    tokenizer = load_tokenizer(tokenizer)
    settings = check_settings(tokenizer, inputs, block_size, workers, blocks_per_shard)
    if split_bytes < 1:
        raise DataError(f"split bytes must be >= 1, got {split_bytes}")
    flags = shlex.split(pipeline_options) if isinstance(pipeline_options, str) else list(pipeline_options)
    options = PipelineOptions(_default_flags(workers) + flags)
    sources = [_open(str(spec), text_field) for spec in inputs]
    key = dataset_key(settings, [identity for _, identity in sources])
    output = _absolute(str(output))
    created = not FileSystems.exists(output)
    done, state = _claim_output(output, key)
    if done is not None:
        return done, {}
    if state is None:
        _write_text(FileSystems.join(output, PROGRESS_FILE),
                    json.dumps({"engine": "beam", "key": key}, indent=1, sort_keys=True) + "\n")
    work = FileSystems.join(output, WORK_DIR)
    items = [item for number, (source, _) in enumerate(sources) for item in _items(number, source, split_bytes)]

    pipeline = beam.Pipeline(options=options)
    _build(pipeline, items, tokenizer, settings, output, work)
    try:
        result = pipeline.run()
        result.wait_until_finish()
    except Exception:
        bad_input = _bad_input(work, items)
        if bad_input is None:
            raise  # keep progress.json and work/: the rerun resumes
        _discard(output, created)
        raise DataError(bad_input) from None
    index = _finish(key, items, output, work, created)
    counters = result.metrics().query(MetricsFilter().with_namespace(_METRICS))["counters"]
    return index, {c.key.metric.name: c.committed for c in counters}


def _build(pipeline, items: list[WorkItem], tokenizer, settings: dict, output: str, work: str) -> None:
    """Pass 1 (tokenize every item), then, once all are done, pass 2 (write every shard)."""
    import apache_beam as beam

    summaries = (pipeline | "items" >> beam.Create(items) | "spread items" >> beam.Reshuffle()
                 | "tokenize" >> beam.Map(_tokenize, tokenizer, settings, work))
    _ = (summaries | "all summaries" >> beam.combiners.ToList() | "layout" >> beam.FlatMap(_layout, settings)
         | "spread shards" >> beam.Reshuffle() | "write shards" >> beam.Map(_write_shard, settings, output, work))


def _finish(key: dict, items: list[WorkItem], output: str, work: str, created: bool) -> dict:
    """The index from the work files, written last; then the work files and progress.json go."""
    from apache_beam.io.filesystems import FileSystems

    settings = key["settings"]
    summaries = [json.loads(_read_text(FileSystems.join(work, f"{item.name}.json"))) for item in items]
    counts = [new_counts() for _ in key["sources"]]
    for item, summary in zip(items, summaries):
        for name, value in summary["counts"].items():
            counts[item.source][name] += value
    tokens = sum(c["tokens"] for c in counts)
    shards = _layout(summaries, settings)
    if not shards:
        _discard(output, created)
        raise DataError(f"inputs give {tokens} tokens, less than one block of {settings['block_size']}; "
                        "nothing to write")
    records = [json.loads(_read_text(FileSystems.join(work, f"{shard_name(s['number'])}.json"))) for s in shards]
    blocks = sum(r["blocks"] for r in records)
    index = build_index(key, counts, records, tokens - blocks * settings["block_size"])
    _write_text(FileSystems.join(output, INDEX_FILE), index_text(index))
    _delete_tree(work)
    FileSystems.delete([FileSystems.join(output, PROGRESS_FILE)])
    return index


def _default_flags(workers: int) -> list[str]:
    # One process needs no worker processes (in_memory); more run as processes, as --workers does locally.
    mode = "multi_processing" if workers > 1 else "in_memory"
    return ["--runner=DirectRunner", f"--direct_num_workers={workers}", f"--direct_running_mode={mode}",
            "--default_sdk_harness_log_level=WARNING"]


def _absolute(path: str) -> str:
    from apache_beam.io.filesystems import FileSystems

    # Local paths as the local engine records them (the index must not depend on the working directory).
    return os.path.abspath(path) if FileSystems.get_scheme(path) is None else path


def _open(spec: str, text_field: str) -> tuple[Source, dict]:
    """The input's Source and identity (the local engine's for local paths, Beam's metadata for others)."""
    from apache_beam.io.filesystems import FileSystems

    if FileSystems.get_scheme(spec) is None:
        source = open_source(spec, text_field)
        identity = source.identity()
    else:
        source = _remote_source(spec, text_field)
        metadata = FileSystems.match([spec])[0].metadata_list
        if len(metadata) != 1:
            raise DataError(f"input {spec} matches {len(metadata)} files; expected one file")
        identity = {**source.describe(), "bytes": metadata[0].size_in_bytes,
                    "mtime_ns": int(metadata[0].last_updated_in_seconds * 1e9)}
    if source.format not in _FORMATS or source.kind != "text":
        raise DataError(f"input {spec} ({source.format}, {source.kind}): --engine beam reads text from .txt, "
                        ".jsonl/.json (optionally .gz) and .parquet files; prepare it with --engine local")
    try:
        with FileSystems.open(source.path, compression_type="uncompressed") as f:
            f.read(1)
    except Exception as e:  # each of Beam's filesystems raises its own error types
        raise DataError(f"input {spec} cannot be read: {e}") from None
    return source, identity


def _remote_source(spec: str, text_field: str) -> Source:
    from apache_beam.io.filesystems import FileSystems

    name = spec.lower().removesuffix(".gz")
    if name.endswith((".txt", ".text")):
        return Source(spec, "text-lines", "text", text_field)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return Source(spec, "jsonl", "text", text_field)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        with FileSystems.open(spec, compression_type="uncompressed") as f:
            columns = pq.read_schema(f).names
        if text_field not in columns:
            raise DataError(f"input {spec} has no column {text_field!r} (columns: {columns}); choose the field "
                            "with --text-field")
        return Source(spec, "parquet", "text", text_field)
    raise DataError(f"unknown input format for {spec}: --engine beam reads .txt, .jsonl or .json (optionally "
                    ".gz) and .parquet files")


def _items(number: int, source: Source, split_bytes: int) -> Iterator[WorkItem]:
    """Input `number`'s work items: its row groups, its byte ranges, or all of a gzip file."""
    from apache_beam.io.filesystems import FileSystems

    if source.format == "parquet":
        import pyarrow.parquet as pq

        with FileSystems.open(source.path, compression_type="uncompressed") as f:
            groups = pq.ParquetFile(f).num_row_groups
        for group in range(groups):
            yield WorkItem(number, group, source.path, source.format, source.text_field, row_group=group)
    elif source.path.lower().endswith(".gz"):
        yield WorkItem(number, 0, source.path, source.format, source.text_field)
    else:
        size = FileSystems.match([source.path])[0].metadata_list[0].size_in_bytes
        for k, start in enumerate(range(0, size, split_bytes)):
            yield WorkItem(number, k, source.path, source.format, source.text_field, start,
                           min(start + split_bytes, size))


def _documents(item: WorkItem) -> Iterator:
    """The item's documents (Text), in file order; a bad row is the local engine's DataError."""
    from apache_beam.io.filesystems import FileSystems

    if item.format == "parquet":
        import pyarrow.parquet as pq

        with FileSystems.open(item.path, compression_type="uncompressed") as f:
            table = pq.ParquetFile(f).read_row_group(item.row_group, columns=[item.text_field])
        yield from column_texts(table.column(0))
        return
    with FileSystems.open(item.path, compression_type="uncompressed") as raw:
        if item.end < 0:  # a gzip file, read whole
            lines, first = gzip.GzipFile(fileobj=raw), 0
        else:
            if item.start:
                raw.seek(item.start - 1)
                raw.readline()  # the rest of a line that began before the range belongs to the range before
            first = raw.tell()
            lines = _lines_before(raw, item.end)
        for k, line in enumerate(lines):
            if item.format == "text-lines":
                yield text_line(line)
                continue
            try:
                doc = json_text(line, item.text_field)
            except RowError as e:
                raise at_row(item.path, _line_number(item.path, first) + k, e) from None
            yield doc


def _lines_before(f: io.BufferedIOBase, end: int) -> Iterator[bytes]:
    """The lines of `f` from where it stands that begin before byte `end`."""
    position = f.tell()
    while position < end:
        line = f.readline()
        if not line:
            return
        yield line
        position += len(line)


def _line_number(path: str, position: int) -> int:
    """The 1-based number of the line that begins at byte `position` (read only when reporting an error)."""
    from apache_beam.io.filesystems import FileSystems

    newlines = 0
    with FileSystems.open(path, compression_type="uncompressed") as f:
        while position > 0:
            data = f.read(min(position, _COPY_BYTES))
            newlines += data.count(b"\n")
            position -= len(data)
    return newlines + 1


def _tokenize(item: WorkItem, tokenizer, settings: dict, work: str) -> dict:
    """Pass 1: the item's stream into work/ITEM.bin; returns (and writes) its summary."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.metrics import Metrics

    summary_path = FileSystems.join(work, f"{item.name}.json")
    if FileSystems.exists(summary_path):  # done by an earlier run
        return json.loads(_read_text(summary_path))
    dtype = np.dtype(settings["dtype"]).newbyteorder("<")
    counts = new_counts()
    tmp = FileSystems.join(work, f".{item.name}.{uuid.uuid4().hex}.partial")
    try:
        with FileSystems.create(tmp, compression_type="uncompressed") as out:
            docs = _documents(item)
            while chunk := list(itertools.islice(docs, _CHUNK_DOCS)):
                stream, lengths = encode_chunk(tokenizer, [d.text for d in chunk])
                out.write(stream.astype(dtype).tobytes())
                for doc, length in zip(chunk, lengths.tolist()):
                    count_document(counts, doc, length)
            _sync(out)
    except DataError as e:
        _write_text(FileSystems.join(work, f"{item.name}.error"), str(e))
        FileSystems.delete([tmp])
        raise
    FileSystems.rename([tmp], [FileSystems.join(work, f"{item.name}.bin")])
    summary = {"item": item.name, "counts": counts}
    _write_text(summary_path, json.dumps(summary, sort_keys=True))
    Metrics.counter(_METRICS, "documents").inc(counts["documents"])
    Metrics.counter(_METRICS, "empty_documents").inc(counts["empty_documents"])
    Metrics.counter(_METRICS, "tokens").inc(counts["tokens"])
    return summary


def _layout(summaries: list[dict], settings: dict) -> list[dict]:
    """Pass 2's plan: every shard's number, blocks and (item, first token, end token) slices, in order.

    Items in input order (their names sort so) are consecutive pieces of the token stream; the
    tail after the last full block is in no shard."""
    block, per_shard = settings["block_size"], settings["blocks_per_shard"]
    items = sorted((s["item"], s["counts"]["tokens"]) for s in summaries)
    blocks = sum(n for _, n in items) // block
    shards, k, offset = [], 0, 0  # items[k] starts at token `offset`
    for number in range(-(-blocks // per_shard)):
        first, end = number * per_shard * block, min((number + 1) * per_shard, blocks) * block
        pieces = []
        while first < end:
            name, n = items[k]
            if first < offset + n:
                stop = min(end, offset + n)
                pieces.append((name, first - offset, stop - offset))
                first = stop
            if first >= offset + n:
                k, offset = k + 1, offset + n
        shards.append({"number": number, "blocks": (end - number * per_shard * block) // block, "pieces": pieces})
    return shards


def _write_shard(shard: dict, settings: dict, output: str, work: str) -> dict:
    """Pass 2: copies a shard's slices of the item files into shard-NNNNN.bin; returns its index record."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.metrics import Metrics

    name = shard_name(shard["number"])
    record_path = FileSystems.join(work, f"{name}.json")
    if FileSystems.exists(record_path):  # written by an earlier run
        return json.loads(_read_text(record_path))
    size = np.dtype(settings["dtype"]).itemsize
    digest, written = hashlib.sha256(), 0
    tmp = FileSystems.join(work, f".{name}.{uuid.uuid4().hex}.partial")  # leftovers go with work/
    with FileSystems.create(tmp, compression_type="uncompressed") as out:
        for item, first, end in shard["pieces"]:
            with FileSystems.open(FileSystems.join(work, f"{item}.bin"), compression_type="uncompressed") as f:
                f.seek(first * size)
                left = (end - first) * size
                while left:
                    data = f.read(min(left, _COPY_BYTES))
                    if not data:
                        raise OSError(f"{work}/{item}.bin ends {left} bytes early")
                    out.write(data)
                    digest.update(data)
                    left -= len(data)
                    written += len(data)
        _sync(out)
    FileSystems.rename([tmp], [FileSystems.join(output, name)])
    record = {"file": name, "blocks": shard["blocks"], "bytes": written, "sha256": digest.hexdigest()}
    _write_text(record_path, json.dumps(record, sort_keys=True))
    Metrics.counter(_METRICS, "shards").inc()
    Metrics.counter(_METRICS, "blocks").inc(shard["blocks"])
    return record


def _claim_output(output: str, key: dict) -> tuple[dict | None, dict | None]:
    from apache_beam.io.filesystems import FileSystems

    done, state = claim(output, key, "beam", _read_text(FileSystems.join(output, INDEX_FILE)),
                        _read_text(FileSystems.join(output, PROGRESS_FILE)))
    if done is not None or state is not None:
        return done, state
    # An object store has no directories: a prefix is empty when nothing is listed under it.
    listed = FileSystems.match([FileSystems.join(output, "*")])[0].metadata_list
    if listed or FileSystems.get_scheme(output) is None and os.path.exists(output) and not os.path.isdir(output):
        raise DataError(f"output {output} exists and is not an unfinished preparation; choose a new path")
    if not FileSystems.exists(output):
        FileSystems.mkdirs(output)
    return None, None


def _bad_input(work: str, items: list[WorkItem]) -> str | None:
    """The local engine's error for the first bad row in input order, if a worker met one.

    Workers run in any order and the pipeline stops at the first error, so items before the one
    that failed may not have run: those are read here (parsed, not tokenized) for an earlier bad row."""
    from apache_beam.io.filesystems import FileSystems

    failed = [k for k, item in enumerate(items) if FileSystems.exists(FileSystems.join(work, f"{item.name}.error"))]
    if not failed:
        return None
    for item in items[:failed[0]]:
        if not FileSystems.exists(FileSystems.join(work, f"{item.name}.json")):
            try:
                for _ in _documents(item):
                    pass
            except DataError as e:
                return str(e)
    return _read_text(FileSystems.join(work, f"{items[failed[0]].name}.error"))


def _discard(output: str, created: bool) -> None:
    """Removes what a run stopped before its first shard wrote into `output` (found empty or absent)."""
    from apache_beam.io.filesystems import FileSystems

    _delete_tree(FileSystems.join(output, WORK_DIR))
    progress = FileSystems.join(output, PROGRESS_FILE)
    if FileSystems.exists(progress):
        FileSystems.delete([progress])
    if created and FileSystems.get_scheme(output) is None:
        with contextlib.suppress(OSError):  # only when empty
            os.rmdir(output)


def _delete_tree(directory: str) -> None:
    """Deletes the files in `directory`, then the directory where a filesystem has directories."""
    from apache_beam.io.filesystems import FileSystems

    FileSystems.delete([m.path for m in FileSystems.match([FileSystems.join(directory, "*")])[0].metadata_list])
    if FileSystems.exists(directory):
        FileSystems.delete([directory])


def _read_text(path: str) -> str | None:
    from apache_beam.io.filesystems import FileSystems

    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path, compression_type="uncompressed") as f:
        return f.read().decode("utf-8")


def _write_text(path: str, text: str) -> None:
    """Writes `path` under a temporary name and renames it into place: readers see all of it or nothing."""
    from apache_beam.io.filesystems import FileSystems

    directory, name = FileSystems.split(path)
    tmp = FileSystems.join(directory, f".{name}.{uuid.uuid4().hex}.partial")
    with FileSystems.create(tmp, mime_type="text/plain", compression_type="uncompressed") as f:
        f.write(text.encode("utf-8"))
        _sync(f)
    FileSystems.rename([tmp], [path])


def _sync(f) -> None:
    """Flushes a local file to disk before it is renamed into place; object stores commit on close."""
    try:
        fd = f.fileno()
    except (AttributeError, io.UnsupportedOperation):
        return
    f.flush()
    os.fsync(fd)

