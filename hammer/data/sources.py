"""Where documents come from: one `Source` per input, streaming documents in a fixed order.

Formats, chosen from the input's name:
- `*.txt` (or `.txt.gz`): one document per line;
- a directory that is not a HuggingFace dataset: one document per file (every file below it, in
  sorted path order, hidden ones skipped);
- `*.jsonl` / `*.json` (or `.gz`): one JSON object per line, the text in `text_field`;
- `*.parquet`: the column `text_field`;
- a directory written by `datasets.Dataset.save_to_disk`: the column `text_field`;
- `tfds:NAME[:SPLIT]` (split defaults to `train`): a TFDS dataset read through `tfds.data_source`
  (array_record, no TensorFlow); needs the `tfds` extra; the data directory is TFDS's own default
  (`TFDS_DATA_DIR`) unless `tfds_data_dir` says otherwise.

A parquet file or HF dataset without `text_field` but with an `input_ids` column holds ready token
blocks (HammerLLM's own tokenized format); such a source yields the blocks as int arrays, used as is.

Bytes that are not valid UTF-8 are replaced by U+FFFD and counted; a document is never dropped for them.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from hammer.errors import HammerError

TOKENS_COLUMN = "input_ids"
_TFDS_PREFIX = "tfds:"
_REPLACEMENT = "\ufffd"
_READ_BATCH = 1024  # rows per arrow batch: big enough to amortize conversion, small enough to stream


class DataError(HammerError):
    """Input or prepared data that cannot be used as given; the message names the file and the problem."""


@dataclass(frozen=True)
class Text:
    """One document as text, with the number of invalid UTF-8 sequences replaced while decoding it."""

    text: str
    replaced: int = 0


def decode_utf8(raw: bytes) -> Text:
    """Decodes `raw`, replacing each invalid sequence by U+FFFD (maximal subparts, as Unicode advises)."""
    try:
        return Text(raw.decode("utf-8"))
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD characters that were really in the input are not replacements.
        return Text(text, text.count(_REPLACEMENT) - raw.count(_REPLACEMENT.encode()))


def _clean_str(text: str) -> Text:
    """A str from JSON or arrow; lone surrogates (JSON allows "\\udc80") cannot be encoded, so replace them."""
    try:
        text.encode("utf-8")
        return Text(text)
    except UnicodeEncodeError:
        return decode_utf8(text.encode("utf-8", errors="surrogatepass"))


class RowError(ValueError):
    """A record that cannot be read; whoever knows where it lies names the file and row."""


def at_row(path: str, line: int, error: RowError) -> DataError:
    """The DataError of a bad record, naming its file and (1-based) line."""
    return DataError(f"{path}:{line} {error}")


def text_line(raw: bytes) -> Text:
    """One document of a text file: a line without its line ending."""
    return decode_utf8(raw.rstrip(b"\r\n"))


def json_text(raw: bytes, text_field: str) -> Text:
    """The text in `text_field` of one jsonl line (a blank line is an empty document); RowError if none."""
    decoded = decode_utf8(raw)
    if not decoded.text.strip():
        return decoded
    try:
        record = json.loads(decoded.text)
    except json.JSONDecodeError as e:
        raise RowError(f"is not JSON: {e}") from None
    if not isinstance(record, dict) or text_field not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise RowError(f"has no field {text_field!r} (found {fields}); choose the field with --text-field")
    value = record[text_field]
    if value is None:
        return Text("", decoded.replaced)
    if not isinstance(value, str):
        raise RowError(f"field {text_field!r} is a {type(value).__name__}, expected a string")
    cleaned = _clean_str(value)
    return Text(cleaned.text, cleaned.replaced + decoded.replaced)


def column_texts(column) -> Iterator[Text]:
    """The documents of an arrow string column (a null is an empty document)."""
    for value in column.to_pylist():
        yield Text("") if value is None else _clean_str(value)


@dataclass(frozen=True)
class Source:
    """One input. `kind` is "text" (documents to tokenize) or "tokens" (ready blocks of ids)."""

    path: str
    format: str  # text-lines, text-files, jsonl, parquet, hf, tfds
    kind: str
    text_field: str = "text"
    tfds_data_dir: str | None = None

    def describe(self) -> dict:
        """What the index records about this source."""
        if self.kind == "tokens":
            field = TOKENS_COLUMN
        else:
            field = None if self.format in ("text-lines", "text-files") else self.text_field
        return {"path": self.path, "format": self.format, "kind": self.kind, "field": field}

    def identity(self) -> dict:
        """describe() plus sizes and mtimes of the files read, so that a resumed run notices changed inputs."""
        if self.format == "tfds":
            return {**self.describe(), "data_dir": self.tfds_data_dir}
        root = Path(self.path)
        if not root.is_dir():
            stat = root.stat()
            return {**self.describe(), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        listing, total = hashlib.sha256(), 0
        for path in sorted(_walk(root)):
            stat = path.stat()
            listing.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            total += stat.st_size
        return {**self.describe(), "bytes": total, "listing_sha256": listing.hexdigest()}

    def documents(self, start: int = 0) -> Iterator[Text | np.ndarray]:
        """The source's documents from number `start` on: `Text` for text sources, int arrays for tokens."""
        reader = {"text-lines": self._text_lines, "text-files": self._text_files, "jsonl": self._jsonl,
                  "parquet": self._parquet, "hf": self._hf, "tfds": self._tfds}[self.format]
        return reader(start)

    def _text_lines(self, start: int) -> Iterator[Text]:
        with _open_binary(Path(self.path)) as f:
            for raw in itertools.islice(f, start, None):
                yield text_line(raw)

    def _text_files(self, start: int) -> Iterator[Text]:
        for path in sorted(_walk(Path(self.path)))[start:]:
            yield decode_utf8(path.read_bytes())

    def _jsonl(self, start: int) -> Iterator[Text]:
        with _open_binary(Path(self.path)) as f:
            for line, raw in itertools.islice(enumerate(f, 1), start, None):
                try:
                    doc = json_text(raw, self.text_field)
                except RowError as e:
                    raise at_row(self.path, line, e) from None
                yield doc

    def _parquet(self, start: int) -> Iterator[Text | np.ndarray]:
        import pyarrow.parquet as pq

        column = self.text_field if self.kind == "text" else TOKENS_COLUMN
        batches = pq.ParquetFile(self.path).iter_batches(batch_size=_READ_BATCH, columns=[column])
        yield from itertools.islice(self._column_rows(b.column(0) for b in batches), start, None)

    def _hf(self, start: int) -> Iterator[Text | np.ndarray]:
        dataset = _load_hf(Path(self.path))
        column = self.text_field if self.kind == "text" else TOKENS_COLUMN
        table = dataset.with_format("arrow").select_columns([column])
        batches = (table[i:i + _READ_BATCH].column(0) for i in range(start, len(table), _READ_BATCH))
        yield from self._column_rows(batches)

    def _column_rows(self, columns) -> Iterator[Text | np.ndarray]:
        for column in columns:
            if self.kind == "tokens":
                yield from _token_rows(column, self.path)
            else:
                yield from column_texts(column)

    def _tfds(self, start: int) -> Iterator[Text]:
        source = _tfds_source(self.path, self.tfds_data_dir)
        for i in range(start, len(source)):
            record = source[i]
            if self.text_field not in record:
                raise DataError(f"{self.path} has no feature {self.text_field!r} (found {sorted(record)}); "
                                "choose the field with --text-field")
            value = record[self.text_field]
            yield decode_utf8(value) if isinstance(value, bytes) else _clean_str(str(value))


def open_source(path: str | os.PathLike, text_field: str = "text", tfds_data_dir: str | None = None) -> Source:
    """Recognizes the format of `path` and checks that its text (or token) field is there."""
    spec = str(path)
    if not spec.startswith(_TFDS_PREFIX):
        spec = os.path.abspath(spec)  # the index and a resumed run must not depend on the working directory
    if spec.startswith(_TFDS_PREFIX):
        _tfds_source(spec, tfds_data_dir)  # fail now, not after the first shard, when TFDS or the data is missing
        return Source(spec, "tfds", "text", text_field, tfds_data_dir)
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"input {spec} not found")
    name = p.name.lower().removesuffix(".gz")
    if p.is_dir():
        if (p / "dataset_dict.json").is_file():
            splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
            raise DataError(f"input {spec} is a DatasetDict with splits {splits}; pass one split's "
                            f"directory, e.g. {p / (splits[0] if splits else 'train')}")
        if (p / "state.json").is_file() and (p / "dataset_info.json").is_file():
            columns = list(_load_hf(p).column_names)
            return Source(spec, "hf", _kind(spec, columns, text_field), text_field)
        if not any(_walk(p)):
            raise DataError(f"input directory {spec} holds no files")
        return Source(spec, "text-files", "text", text_field)
    if name.endswith((".txt", ".text")):
        return Source(spec, "text-lines", "text", text_field)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return Source(spec, "jsonl", "text", text_field)
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"reading {spec} needs pyarrow: pip install pyarrow") from None
        columns = pq.read_schema(p).names
        return Source(spec, "parquet", _kind(spec, columns, text_field), text_field)
    raise DataError(f"unknown input format for {spec}: expected .txt, .jsonl or .json (optionally .gz), "
                    ".parquet, a datasets save_to_disk directory, a directory of text files, or tfds:NAME[:SPLIT]")


def _kind(spec: str, columns: list[str], text_field: str) -> str:
    if text_field in columns:
        return "text"
    if TOKENS_COLUMN in columns:
        return "tokens"
    raise DataError(f"input {spec} has no column {text_field!r} (columns: {columns}); choose the field "
                    f"with --text-field, or give a column {TOKENS_COLUMN!r} of token blocks")


def _token_rows(column, path: str) -> Iterator[np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc

    for chunk in column.chunks if isinstance(column, pa.ChunkedArray) else [column]:
        if not pa.types.is_list(chunk.type) and not pa.types.is_large_list(chunk.type) \
                or not pa.types.is_integer(chunk.type.value_type) or chunk.null_count:
            raise DataError(f"{path}: column {TOKENS_COLUMN!r} must hold lists of ints, got {chunk.type}"
                            + (" with null rows" if chunk.null_count else ""))
        if len(chunk) == 0:
            continue
        lengths = pc.list_value_length(chunk).to_numpy()
        values = chunk.flatten().to_numpy()
        yield from np.split(values, np.cumsum(lengths)[:-1])


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _load_hf(path: Path):
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {path} needs the datasets package: pip install datasets") from None
    return datasets.load_from_disk(str(path))


def _tfds_source(spec: str, data_dir: str | None):
    name, _, split = spec[len(_TFDS_PREFIX):].partition(":")
    if not name:
        raise DataError(f"input {spec}: expected tfds:NAME[:SPLIT]")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"input {spec} needs tensorflow-datasets: pip install 'hammerllm[tfds]'") from None
    return tfds.data_source(name, split=split or "train", data_dir=data_dir)
