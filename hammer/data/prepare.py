"""Tokenize documents and pack them into fixed-length blocks, written as token shards plus a JSON index.

A prepared dataset is a directory:
  shard-00000.bin, ...  raw little-endian token ids (uint16 when the vocab fits, else uint32),
                        `blocks_per_shard` blocks of `block_size` ids each; the last shard may hold fewer
  index.json            settings, tokenizer fingerprint, per-source counts and every shard's size and
                        sha256; written last and atomically, so a directory is a dataset exactly when
                        it has an index (a reader never sees half a dataset)
  progress.json         present only while a preparation is unfinished: what is done, where to resume

Packing: every text document becomes [BOS] + ids + [EOS] (ids encoded without special tokens, so the
rule holds whatever the tokenizer's add_bos_token/add_eos_token say). Documents are concatenated in
input order and cut into consecutive blocks (HF `group_texts`), so a document may span blocks and a
block may hold several documents. The tail after the last full block (< block_size tokens) is
dropped, as `group_texts` does, and recorded in the index as `dropped_tokens`. Rows of a token source
(an `input_ids` column) are blocks already and are used as is: each must hold exactly block_size
valid ids; token and text sources cannot be mixed in one dataset (prepare them apart and mix them in
the loader).

Documents whose text is empty or only whitespace are skipped and counted (`empty_documents`).
Invalid UTF-8 is replaced by U+FFFD and counted (`invalid_utf8_documents`, `replaced_sequences`).

Shards hold 2**25 tokens by default (64 MiB as uint16): the unit of resumption and of the size check.

Resume: after each shard is written (fsync, then renamed into place) progress.json records the
shards so far and where the next shard's first token comes from: (source, document, offset of that
token in the document's [BOS] + ids + [EOS]), plus the counts of the documents before it. A rerun
with the same arguments (same inputs by path, size and mtime, same tokenizer and settings) skips
those documents without tokenizing them and carries on. Blocks depend only on the token stream, and
worker results are consumed in input order, so the output is byte-identical to an uninterrupted run
(and to a run with another number of workers).

`hammer/data/prepare_beam.py` prepares the same bytes on Apache Beam (`--engine beam`); the two share
the packing rule, the settings, the index and the output checks below.

Nothing a user made is overwritten: an output that holds anything but an unfinished preparation of
the very same inputs, or the very same finished dataset (then nothing is done), is refused. A run
stopped by bad input (a DataError) before any shard of its own or an earlier run's leaves no output.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from hammer.data.sources import DataError, Source, Text, open_source
from hammer.fsio import atomic_file

DEFAULT_BLOCK_SIZE = 2048
DEFAULT_SHARD_TOKENS = 2**25
FORMAT = "hammer-token-blocks/1"
INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.json"
_CHUNK_DOCS = 256  # documents per worker task: large enough to amortize the pickling, small to stream
COUNTS = ("documents", "empty_documents", "invalid_utf8_documents", "replaced_sequences", "tokens")

Opener = Callable[[str, int], int]  # as `open(..., opener=)`: lets a caller (a test) choose where bytes go


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocab of `vocab_size`."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def wrap(ids: Sequence[int], bos_id: int, eos_id: int) -> np.ndarray:
    """One document's ids as they enter the stream: [BOS] + ids + [EOS]."""
    out = np.empty(len(ids) + 2, np.uint32)
    out[0], out[1:-1], out[-1] = bos_id, ids, eos_id
    return out


def cut(stream: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`stream` cut into consecutive blocks: ([n, block_size] blocks, the < block_size tokens left)."""
    n = len(stream) // block_size
    return stream[: n * block_size].reshape(n, block_size), stream[n * block_size:]


def pack(documents: Iterable[Sequence[int]], block_size: int, bos_id: int, eos_id: int,
         carry: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of `carry` followed by each document as [BOS] + ids + [EOS]; returns (blocks, new carry).

    Feeding the returned carry into the next call packs a stream piece by piece exactly as in one go.
    """
    parts = [np.asarray(carry, np.uint32)] + [wrap(ids, bos_id, eos_id) for ids in documents]
    return cut(np.concatenate(parts), block_size)


def encode_chunk(tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """[BOS] + ids + [EOS] of every non-blank text, concatenated; and each text's length (0 when blank)."""
    lengths = np.zeros(len(texts), np.int64)
    kept = [i for i, t in enumerate(texts) if t.strip()]
    encoded = tokenizer.encode_batch([texts[i] for i in kept], add_special_tokens=False)
    docs = [wrap(ids, tokenizer.bos_id, tokenizer.eos_id) for ids in encoded]
    lengths[kept] = [len(d) for d in docs]
    return (np.concatenate(docs) if docs else np.empty(0, np.uint32)), lengths


# A worker process's tokenizer, set once by the pool initializer so tasks carry only their texts.
_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_chunk(_worker_tokenizer, texts)


@dataclass(frozen=True)
class _Chunk:
    source: int
    start: int  # number of the first document within its source
    docs: list  # Text for text sources, id arrays for token sources


@dataclass
class _Resume:
    source: int = 0
    document: int = 0
    offset: int = 0  # tokens of that document already in earlier shards


def prepare(tokenizer, inputs: Sequence[str | os.PathLike], output: str | os.PathLike, *,
            block_size: int = DEFAULT_BLOCK_SIZE, text_field: str = "text", workers: int = 1,
            blocks_per_shard: int | None = None, tfds_data_dir: str | None = None,
            progress: bool = False, opener: Opener | None = None) -> dict:
    """Prepares `inputs` into the dataset directory `output`; returns its index (see the module doc).

    `tokenizer` is a path to a tokenizer directory or an object with `hammer.tokenizer.Tokenizer`'s
    encode_batch, bos_id, eos_id, vocab_size and fingerprint (picklable when `workers` > 1).
    `opener` is passed to `open` for every shard file (the default writes plain files).
    Workers are spawned processes, so a script calling this with `workers` > 1 needs the usual
    `if __name__ == "__main__":` guard.
    """
    tokenizer = load_tokenizer(tokenizer)
    settings = check_settings(tokenizer, inputs, block_size, workers, blocks_per_shard)
    sources = [open_source(p, text_field, tfds_data_dir) for p in inputs]
    if len({s.kind for s in sources}) > 1:
        raise DataError("inputs mix text with ready token blocks "
                        f"({[s.path for s in sources if s.kind == 'tokens']}); prepare them apart and mix "
                        "the prepared datasets in the loader")
    key = dataset_key(settings, [s.identity() for s in sources])
    output = Path(output)
    created = not output.exists()
    done, state = _claim_output(output, key)
    if done is not None:
        return done
    try:
        return _Preparation(tokenizer, sources, output, settings, key, state, workers, opener, progress).run()
    except DataError:
        # Bad input is fixed by changing it, and a changed input never resumes this run, so its
        # progress file would only block the corrected rerun. Other failures (an interrupt, a full
        # disk) keep their progress to resume from.
        if state is None or not state["shards"]:
            _discard(output, created)
        raise


def load_tokenizer(tokenizer):
    """`tokenizer` itself, or the `hammer.tokenizer.Tokenizer` in the directory it names."""
    if isinstance(tokenizer, (str, os.PathLike)):
        from hammer.tokenizer import Tokenizer  # sentencepiece loads only when preparing

        return Tokenizer.from_pretrained(tokenizer)
    return tokenizer


def check_settings(tokenizer, inputs: Sequence, block_size: int, workers: int,
                   blocks_per_shard: int | None) -> dict:
    """The index's settings, after refusing what no engine can prepare."""
    if block_size < 2:
        raise DataError(f"block size must be >= 2 (room for BOS and EOS), got {block_size}")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise DataError(f"tokenizer {tokenizer!r} lacks a BOS or EOS token (bos_id={tokenizer.bos_id}, "
                        f"eos_id={tokenizer.eos_id}); documents are packed as [BOS] + ids + [EOS]")
    if blocks_per_shard is None:
        blocks_per_shard = max(1, DEFAULT_SHARD_TOKENS // block_size)
    if blocks_per_shard < 1:
        raise DataError(f"blocks per shard must be >= 1, got {blocks_per_shard}")
    if not inputs:
        raise DataError("no inputs given")
    return {"block_size": block_size, "blocks_per_shard": blocks_per_shard,
            "dtype": token_dtype(tokenizer.vocab_size).name,
            "tokenizer": {"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                          "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}}


def dataset_key(settings: dict, identities: list[dict]) -> dict:
    """What makes two preparations the same dataset: format, settings and inputs (not the engine)."""
    return {"format": FORMAT, "settings": settings, "sources": identities}


def new_counts() -> dict:
    return dict.fromkeys(COUNTS, 0)


def build_index(key: dict, counts: list[dict], shards: list[dict], dropped_tokens: int) -> dict:
    """The index of a finished dataset: `key`, each source's counts, totals and the shards."""
    return {"format": key["format"], "settings": key["settings"],
            "sources": [{**identity, **c} for identity, c in zip(key["sources"], counts)],
            "documents": sum(c["documents"] for c in counts), "tokens": sum(c["tokens"] for c in counts),
            "blocks": sum(s["blocks"] for s in shards), "dropped_tokens": dropped_tokens, "shards": shards}


def index_text(index: dict) -> str:
    return json.dumps(index, indent=1, sort_keys=True) + "\n"


def claim(output: str, key: dict, engine: str, index: str | None,
          progress: str | None) -> tuple[dict | None, dict | None]:
    """Decides from an output's index and progress file (their text, or None when absent) what to do:
    (its index, None) when it already is this dataset; (None, the progress state) to resume it;
    (None, None) when it holds neither (the caller checks that it is empty)."""
    if index is not None:
        found = json.loads(index)
        if _key_of(found) == key:
            return found, None
        raise DataError(f"output {output} already holds a prepared dataset of other inputs or settings "
                        f"({_differences(_key_of(found), key)} differ); choose another --output")
    if progress is not None:
        state = json.loads(progress)
        if state["key"] != key:
            raise DataError(f"output {output} holds an unfinished preparation of other inputs or settings "
                            f"({_differences(state['key'], key)} differ); rerun that command to finish it, "
                            "or choose another --output")
        other = state.get("engine", "local")  # progress files of earlier versions name no engine
        if other != engine:
            raise DataError(f"output {output} holds an unfinished preparation by the {other} engine; "
                            f"rerun it with --engine {other} to finish it, or choose another --output")
        return None, state
    return None, None


def _discard(output: Path, created: bool) -> None:
    """Removes what a fresh run wrote into `output` (which it found empty or absent)."""
    for path in output.iterdir():
        if path.name == PROGRESS_FILE or path.name.startswith("shard-"):
            path.unlink()
    if created:
        with contextlib.suppress(OSError):  # only when empty
            output.rmdir()


def _claim_output(output: Path, key: dict) -> tuple[dict | None, dict | None]:
    """(finished index, None) when `output` already is this dataset; (None, progress or None) to (re)start."""
    index_path, progress_path = output / INDEX_FILE, output / PROGRESS_FILE
    done, state = claim(str(output), key, "local", index_path.read_text() if index_path.is_file() else None,
                        progress_path.read_text() if progress_path.is_file() else None)
    if done is not None or state is not None:
        return done, state
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise DataError(f"output {output} exists and is not an unfinished preparation; choose a new path")
    output.mkdir(parents=True, exist_ok=True)
    return None, None


def _key_of(index: dict) -> dict:
    return {"format": index.get("format"), "settings": index.get("settings"),
            "sources": [{k: v for k, v in s.items() if k not in COUNTS} for s in index.get("sources", [])]}


def _differences(old: dict, new: dict) -> str:
    names = [k for k in ("format", "settings", "sources") if old.get(k) != new.get(k)]
    return ", ".join(names)


class _Preparation:
    """One run of `prepare`: the token stream, the open shard and the counts."""

    def __init__(self, tokenizer, sources: list[Source], output: Path, settings: dict, key: dict,
                 state: dict | None, workers: int, opener: Opener | None, progress: bool):
        self.tokenizer, self.sources, self.output = tokenizer, sources, output
        self.settings, self.key, self.workers = settings, key, workers
        self.opener, self.progress = opener, progress
        self.block_size = settings["block_size"]
        self.dtype = np.dtype(settings["dtype"])
        fresh = state is None
        state = state or {"shards": [], "resume": vars(_Resume()),
                          "counts": [new_counts() for _ in sources]}
        self.shards: list[dict] = state["shards"]
        self.resume = _Resume(**state["resume"])
        self.counts: list[dict] = state["counts"]
        self.file = None  # the shard being written
        self.blocks_in_shard = 0
        if fresh:  # recorded before any shard, so an interrupted first shard can resume too
            self._save_progress(self.resume, self.counts)
        for shard in self.shards:
            path = output / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["bytes"]:
                raise DataError(f"{path} of the unfinished preparation in {output} is missing or cut short; "
                                "remove the directory and prepare again")

    def run(self) -> dict:
        from tqdm import tqdm

        carry = np.empty(0, np.uint32)
        with tqdm(desc=f"prepare {self.output.name}", unit="tok", unit_scale=True, disable=not self.progress,
                  initial=sum(s["blocks"] for s in self.shards) * self.block_size) as bar:
            try:
                for chunk, stream, lengths in self._encoded_chunks():
                    carry = self._pack_chunk(chunk, stream, lengths, carry)
                    bar.update(int(lengths.sum()))
                if self.blocks_in_shard:
                    self._close_shard(None)
            finally:
                self._discard_open_shard()
        blocks = sum(s["blocks"] for s in self.shards)
        if blocks == 0:
            raise DataError(f"inputs give {len(carry)} tokens, less than one block of {self.block_size}; "
                            "nothing to write")
        index = build_index(self.key, self.counts, self.shards, len(carry))
        with atomic_file(self.output / INDEX_FILE) as f:
            f.write(index_text(index))
        (self.output / PROGRESS_FILE).unlink(missing_ok=True)
        return index

    def _chunks(self) -> Iterator[_Chunk]:
        for number in range(self.resume.source, len(self.sources)):
            start = self.resume.document if number == self.resume.source else 0
            docs: list = []
            for doc in self.sources[number].documents(start):
                docs.append(doc)
                if len(docs) == _CHUNK_DOCS:
                    yield _Chunk(number, start, docs)
                    start, docs = start + len(docs), []
            if docs:
                yield _Chunk(number, start, docs)

    def _encoded_chunks(self) -> Iterator[tuple[_Chunk, np.ndarray, np.ndarray]]:
        """Chunks with their [BOS] + ids + [EOS] streams, in input order whatever the number of workers."""
        chunks = self._chunks()
        if self.sources[0].kind == "tokens":
            for chunk in chunks:
                yield chunk, *self._check_rows(chunk)
        elif self.workers == 1:
            for chunk in chunks:
                yield chunk, *encode_chunk(self.tokenizer, [d.text for d in chunk.docs])
        else:
            # spawn, not fork: the parent may hold threads (or jax) that a forked child must not inherit.
            pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_init_worker, initargs=(self.tokenizer,))
            try:
                pending: collections.deque = collections.deque()
                for chunk in chunks:
                    pending.append((chunk, pool.submit(_encode_in_worker, [d.text for d in chunk.docs])))
                    if len(pending) > 2 * self.workers:  # bounded read-ahead: memory stays flat
                        chunk, future = pending.popleft()
                        yield chunk, *future.result()
                while pending:
                    chunk, future = pending.popleft()
                    yield chunk, *future.result()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    def _check_rows(self, chunk: _Chunk) -> tuple[np.ndarray, np.ndarray]:
        vocab = self.tokenizer.vocab_size
        for k, row in enumerate(chunk.docs):
            where = f"{self.sources[chunk.source].path} row {chunk.start + k}"
            if len(row) != self.block_size:
                raise DataError(f"{where} has {len(row)} ids; ready blocks must match --block-size "
                                f"{self.block_size}")
            if len(row) and (row.min() < 0 or row.max() >= vocab):
                raise DataError(f"{where} holds id {row.max() if row.max() >= vocab else row.min()}, outside "
                                f"the tokenizer's vocab of {vocab}")
        stream = np.concatenate(chunk.docs).astype(np.uint32) if chunk.docs else np.empty(0, np.uint32)
        return stream, np.full(len(chunk.docs), self.block_size, np.int64)

    def _pack_chunk(self, chunk: _Chunk, stream: np.ndarray, lengths: np.ndarray, carry: np.ndarray) -> np.ndarray:
        bs, position = self.block_size, 0
        for k, length in enumerate(lengths.tolist()):
            doc, number = chunk.docs[k], chunk.start + k
            tokens = stream[position: position + length]
            position += length
            resumed = (chunk.source, number) == (self.resume.source, self.resume.document)
            skip = self.resume.offset if resumed else 0
            before = len(carry)
            blocks, rest = cut(np.concatenate([carry, tokens[skip:]]) if before else tokens[skip:], bs)
            for b, block in enumerate(blocks):
                self._write_block(block)
                if self.blocks_in_shard == self.settings["blocks_per_shard"]:
                    following = skip + (b + 1) * bs - before  # offset in this document of the next token
                    if following < length:
                        self._close_shard((_Resume(chunk.source, number, following), self.counts))
                    else:
                        after = copy.deepcopy(self.counts)
                        count_document(after[chunk.source], doc, length)
                        self._close_shard((_Resume(chunk.source, number + 1, 0), after))
            carry = rest.copy()  # a copy: the chunk's stream can be freed
            count_document(self.counts[chunk.source], doc, length)
        return carry

    def _write_block(self, block: np.ndarray) -> None:
        if self.file is None:
            path = self.output / (shard_name(len(self.shards)) + ".partial")
            self.file = open(path, "wb", opener=self.opener)
            self.hash = hashlib.sha256()
        data = block.astype(self.dtype.newbyteorder("<")).tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.blocks_in_shard += 1

    def _close_shard(self, resume: tuple[_Resume, list[dict]] | None) -> None:
        """Finishes the open shard; unless it is the last one, records where the next one starts."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        name = shard_name(len(self.shards))
        os.replace(self.output / (name + ".partial"), self.output / name)
        self.shards.append({"file": name, "blocks": self.blocks_in_shard,
                            "bytes": self.blocks_in_shard * self.block_size * self.dtype.itemsize,
                            "sha256": self.hash.hexdigest()})
        self.blocks_in_shard = 0
        if resume is not None:
            self._save_progress(*resume)

    def _save_progress(self, where: _Resume, counts: list[dict]) -> None:
        state = {"engine": "local", "key": self.key, "shards": self.shards, "resume": vars(where), "counts": counts}
        with atomic_file(self.output / PROGRESS_FILE) as f:
            f.write(json.dumps(state, indent=1, sort_keys=True) + "\n")

    def _discard_open_shard(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
            (self.output / (shard_name(len(self.shards)) + ".partial")).unlink(missing_ok=True)


def count_document(counts: dict, doc, length: int) -> None:
    """Adds one document (a Text or a row of ids) of `length` stream tokens to a source's counts."""
    if isinstance(doc, Text) and doc.replaced:
        counts["invalid_utf8_documents"] += 1
        counts["replaced_sequences"] += doc.replaced
    if length:
        counts["documents"] += 1
        counts["tokens"] += length
    else:
        counts["empty_documents"] += 1
