"""A prepared dataset read back: blocks of token ids, memory-mapped from the shards `prepare` wrote.

`load_prepared(DIR)` trusts nothing but the index: it refuses a directory without one (an unfinished
or failed preparation), a missing shard, a shard whose size differs from the index (cut short or
grown), and, when given the tokenizer meant to read it, an index made with another tokenizer.
Contents are not hashed on load (that would read every byte); `verify_checksums()` does it on demand.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from hammer.data.prepare import FORMAT, INDEX_FILE, PROGRESS_FILE
from hammer.data.sources import DataError


class PreparedDataset:
    """`len()` blocks; `ds[i]` is block i (block_size ids, in packing order); `ds.metadata` is the index."""

    def __init__(self, path: str | os.PathLike, metadata: dict):
        self.path = Path(path)
        self.metadata = metadata
        settings = metadata["settings"]
        self.block_size: int = settings["block_size"]
        self.blocks_per_shard: int = settings["blocks_per_shard"]
        self.dtype = np.dtype(settings["dtype"]).newbyteorder("<")
        self.fingerprint: str = settings["tokenizer"]["fingerprint"]
        self._shards = metadata["shards"]
        self._maps: dict[int, np.memmap] = {}  # opened on first use: a large dataset has many shards
        self._length = sum(s["blocks"] for s in self._shards)

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f"PreparedDataset({str(self.path)!r}, blocks={len(self)}, block_size={self.block_size})"

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks in {self.path}")
        i %= len(self)
        return np.asarray(self._shard(i // self.blocks_per_shard)[i % self.blocks_per_shard])

    def read(self, indices: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Blocks `indices` into `out` (`[len(indices), block_size]`, int32 unless given); one gather per shard."""
        indices = np.asarray(indices, np.int64)
        if out is None:
            out = np.empty((len(indices), self.block_size), np.int32)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"blocks {indices.min()}..{indices.max()} out of range for {len(self)} blocks")
        shard_of = indices // self.blocks_per_shard
        for shard in np.unique(shard_of):
            rows = np.flatnonzero(shard_of == shard)
            out[rows] = self._shard(int(shard))[indices[rows] % self.blocks_per_shard]
        return out

    def verify_checksums(self) -> None:
        """Hashes every shard against the index; raises DataError naming the first that differs."""
        for shard in self._shards:
            digest = hashlib.sha256()
            with open(self.path / shard["file"], "rb") as f:
                for piece in iter(lambda: f.read(1 << 24), b""):
                    digest.update(piece)
            if digest.hexdigest() != shard["sha256"]:
                raise DataError(f"{self.path / shard['file']} has sha256 {digest.hexdigest()}, "
                                f"the index says {shard['sha256']}")

    def _shard(self, number: int) -> np.memmap:
        if number not in self._maps:
            shard = self._shards[number]
            self._maps[number] = np.memmap(self.path / shard["file"], dtype=self.dtype, mode="r",
                                           shape=(shard["blocks"], self.block_size))
        return self._maps[number]


def load_prepared(path: str | os.PathLike, tokenizer=None) -> PreparedDataset:
    """Opens the dataset `prepare` wrote to `path`, checking the index and every shard's size.

    `tokenizer` (a Tokenizer or its fingerprint), when given, must be the one the data was made with.
    """
    path = Path(path)
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        if (path / PROGRESS_FILE).is_file():
            raise DataError(f"{path} is an unfinished preparation (no {INDEX_FILE}); rerun the same "
                            "`hammer data prepare` command to finish it")
        if not path.exists():
            raise FileNotFoundError(f"prepared dataset {path} not found")
        raise DataError(f"{path} is not a prepared dataset (no {INDEX_FILE})")
    try:
        metadata = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{index_path} is not valid JSON: {e}") from None
    if metadata.get("format") != FORMAT:
        raise DataError(f"{index_path} has format {metadata.get('format')!r}, expected {FORMAT!r}")
    expected = metadata["settings"]["tokenizer"]["fingerprint"]
    if tokenizer is not None:
        given = tokenizer if isinstance(tokenizer, str) else tokenizer.fingerprint
        if given != expected:
            raise DataError(f"{path} was prepared with tokenizer {expected}, not with the given tokenizer "
                            f"{given}; prepare the data again with this tokenizer")
    for shard in metadata["shards"]:
        shard_path = path / shard["file"]
        if not shard_path.is_file():
            raise FileNotFoundError(f"shard {shard_path} listed in {index_path} is missing")
        size = shard_path.stat().st_size
        if size != shard["bytes"]:
            raise DataError(f"shard {shard_path} is {size} bytes, the index says {shard['bytes']} "
                            f"({'cut short' if size < shard['bytes'] else 'grown'} since it was written)")
    return PreparedDataset(path, metadata)
