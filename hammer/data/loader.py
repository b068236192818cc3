"""Training batches: prepared datasets mixed by weight and shuffled with a seed; named validation sets.

Mixing. One pass ("epoch") of a mixture has T slots, T = the datasets' blocks together. Dataset d
gets c_d = w_d * T of them (rounded by largest remainder so that they sum to T); with the default
weights, proportional to size, c_d = len(d): every block once per epoch, HammerLLM's random merge of
its sources. Slot t of epoch e goes through a seeded permutation of [0, T) to p; the range of
[0, T) that p falls in (c_0 values for dataset 0, then c_1 for dataset 1, ...) names the dataset d,
and p's place r in that range the block: position e * c_d + r of d's endless stream, which is d's
blocks in a fresh seeded permutation each round. So an epoch holds each dataset exactly c_d times,
an up-weighted dataset shows all its blocks once per round of its stream before any again, a
down-weighted one shows new blocks each epoch, and any run of consecutive slots is drawn without replacement from the epoch: dataset d's
share is w_d within hypergeometric sampling error.

The permutations are `index_shuffle.permute`: evaluated at the rows of a batch only, never built, so
global batch `step` costs O(batch) and is a pure function of (seed, step). `LoaderState(seed, step)`
is the loader's whole position; restoring it replays nothing. The order is the same on every machine
and numpy version (64-bit integer arithmetic only).

Several hosts: every process derives the same global batch; process p of P takes rows
[p * B / P, (p + 1) * B / P) and reads only those blocks, or the rows it is given (those its
devices hold under a mesh, which need be neither contiguous nor disjoint from another process's).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from hammer.data.index_shuffle import derive_key, permute
from hammer.data.prepared import PreparedDataset, load_prepared
from hammer.data.sources import DataError

_MIX, _DATASET = 0, 1  # key-derivation tags keeping the mixture's and the datasets' permutations apart


@dataclass(frozen=True)
class LoaderState:
    """Where a loader stands: the next global batch is number `step` of the order that `seed` makes."""

    seed: int
    step: int

    def __post_init__(self):
        if self.seed < 0 or self.step < 0:
            raise DataError(f"loader seed and step must be >= 0, got seed={self.seed}, step={self.step}")

    def to_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    @classmethod
    def from_dict(cls, data: Mapping) -> "LoaderState":
        return cls(int(data["seed"]), int(data["step"]))


class Mixture:
    """Datasets with weights (default: in proportion to their sizes); `locate()` maps slots to blocks."""

    def __init__(self, datasets: Sequence[PreparedDataset], weights: Sequence[float] | None = None):
        if not datasets:
            raise DataError("a mixture needs at least one dataset")
        first = datasets[0]
        for ds in datasets[1:]:
            if ds.block_size != first.block_size:
                raise DataError(f"{ds.path} has blocks of {ds.block_size} tokens, {first.path} of "
                                f"{first.block_size}; mixed datasets must share the block size")
            if ds.fingerprint != first.fingerprint:
                raise DataError(f"{ds.path} was made with tokenizer {ds.fingerprint}, {first.path} with "
                                f"{first.fingerprint}; mixed datasets must share the tokenizer")
        sizes = np.array([len(ds) for ds in datasets], np.float64)
        if weights is None:
            weights = sizes
        weights = np.asarray(weights, np.float64)
        valid = weights.shape == sizes.shape and np.all(np.isfinite(weights)) and weights.min() >= 0
        if not valid or weights.sum() <= 0:
            raise DataError(f"mixture weights must be one non-negative number per dataset ({len(datasets)}), "
                            f"not all zero; got {weights.tolist()}")
        self.datasets = list(datasets)
        self.block_size = first.block_size
        self.weights = weights / weights.sum()
        self.epoch_size = int(sizes.sum())
        self.counts = _apportion(self.weights, self.epoch_size)
        self._starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])

    def locate(self, seed: int, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, block) of each of `slots`, numbered from the first slot of epoch 0."""
        epochs, within = np.divmod(np.asarray(slots, np.int64), self.epoch_size)
        datasets = np.empty(len(within), np.int64)
        positions = np.empty(len(within), np.int64)  # in each dataset's endless stream
        for e in np.unique(epochs):
            rows = epochs == e
            p = permute(within[rows], self.epoch_size, derive_key([seed, _MIX, e]))
            d = np.searchsorted(self._starts, p, side="right") - 1
            datasets[rows], positions[rows] = d, e * self.counts[d] + p - self._starts[d]
        blocks = np.empty(len(within), np.int64)
        for d in np.unique(datasets):
            n = len(self.datasets[d])
            rows = np.flatnonzero(datasets == d)
            rounds, offsets = np.divmod(positions[rows], n)
            for r in np.unique(rounds):
                here = rounds == r
                blocks[rows[here]] = permute(offsets[here], n, derive_key([seed, _DATASET, d, r]))
        return datasets, blocks


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to `weights` summing to `total` (largest remainder; ties to the first)."""
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


class Loader:
    """Iterator of this process's rows of each global batch (int32 `[B / P, block_size]`)."""

    def __init__(self, mixture: Mixture, global_batch_size: int, *, seed: int = 0, step: int = 0,
                 process_index: int = 0, process_count: int = 1, rows: Sequence[int] | None = None):
        """`rows`: the indices in each global batch this process reads, instead of its contiguous
        share of `process_count`."""
        if global_batch_size < 1 or (rows is None and global_batch_size % process_count):
            raise DataError(f"global batch size {global_batch_size} must be a positive multiple of the "
                            f"process count {process_count}")
        LoaderState(seed, step)  # refuses a negative seed or step
        if not 0 <= process_index < process_count:
            raise DataError(f"process index {process_index} is not in [0, {process_count})")
        if rows is None:
            share = global_batch_size // process_count
            rows = np.arange(process_index * share, (process_index + 1) * share)
        self.rows = np.asarray(rows, np.int64)
        if self.rows.size == 0 or self.rows.min() < 0 or self.rows.max() >= global_batch_size:
            raise DataError(f"rows {self.rows.tolist()} are not indices of a {global_batch_size}-row batch")
        self.mixture = mixture
        self.global_batch_size = global_batch_size
        self.local_batch_size = len(self.rows)
        self.seed, self.step = seed, step

    @property
    def state(self) -> LoaderState:
        return LoaderState(self.seed, self.step)

    def restore(self, state: LoaderState) -> None:
        self.seed, self.step = state.seed, state.step

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def sources(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset, block) of each of this process's rows of global batch `step`."""
        return self.mixture.locate(self.seed, step * self.global_batch_size + self.rows)

    def batch(self, step: int) -> np.ndarray:
        """This process's rows of global batch `step`, read from the shards."""
        datasets, blocks = self.sources(step)
        out = np.empty((len(blocks), self.mixture.block_size), np.int32)
        for d in np.unique(datasets):
            rows = np.flatnonzero(datasets == d)
            out[rows] = self.mixture.datasets[d].read(blocks[rows])
        return out


def documents(blocks: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(segment ids, positions) of packed `blocks` [..., block_size], both int32 of that shape:
    each [BOS] starts a document, whose tokens share a segment id and count positions from 0 at
    it; the tokens before a block's first [BOS] (the end of a document cut by packing) are one
    more, from position 0. What document-masked attention and its RoPE positions read."""
    starts = blocks == bos_id
    starts[..., 0] = True
    segments = np.cumsum(starts, axis=-1, dtype=np.int32)
    index = np.broadcast_to(np.arange(blocks.shape[-1], dtype=np.int32), blocks.shape)
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return segments, (index - first).astype(np.int32)


def document_bos(document_mask: bool, bos_token_id: int | None) -> int | None:
    """The id that starts a document when a run masks documents (None when it does not); a model
    without a bos_token_id cannot."""
    if document_mask and bos_token_id is None:
        raise DataError("document_mask = true needs the model's bos_token_id (config.json), which "
                        "starts each packed document; it is not set")
    return bos_token_id if document_mask else None


def mixture_from_specs(specs: Sequence[str], tokenizer=None) -> Mixture:
    """A mixture from "DIR" or "DIR:WEIGHT" strings (a weight for every dataset or for none)."""
    paths, weights = [], []
    for spec in specs:
        path, _, weight = str(spec).rpartition(":")
        try:
            weights.append(float(weight))
            paths.append(path)
        except ValueError:
            paths.append(str(spec))
    if weights and len(weights) != len(paths):
        raise DataError(f"give a weight for every dataset or for none: {list(specs)}")
    return Mixture([load_prepared(p, tokenizer) for p in paths], weights or None)


def validation_sets(spec: Mapping[str, str | os.PathLike] | str | os.PathLike,
                    tokenizer=None) -> dict[str, PreparedDataset]:
    """Named validation sets: from {name: DIR}, or a directory whose subdirectories are prepared sets."""
    if not isinstance(spec, Mapping):
        root = Path(spec)
        if not root.is_dir():
            raise FileNotFoundError(f"validation directory {root} not found")
        spec = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")}
        if not spec:
            raise DataError(f"validation directory {root} holds no prepared datasets")
    return {name: load_prepared(path, tokenizer) for name, path in spec.items()}


def eval_batches(dataset: PreparedDataset, batch_size: int, *, process_index: int = 0,
                 process_count: int = 1, drop_remainder: bool = False,
                 rows: Sequence[int] | None = None) -> Iterator[np.ndarray]:
    """A validation set in packing order, global batches of `batch_size` blocks, this process's rows
    (its near-equal share, or the given `rows` of each batch, as `Loader`'s).

    The last batch may be short (each process then gets its near-equal share, possibly none) unless
    `drop_remainder`, which keeps shapes fixed for a jitted step (and is needed with `rows`).
    """
    if batch_size < 1 or batch_size % process_count:
        raise DataError(f"batch size {batch_size} must be a positive multiple of the process count "
                        f"{process_count}")
    if rows is not None and not drop_remainder:
        raise DataError("eval_batches: given rows of each batch need drop_remainder=True (full batches)")
    n = len(dataset)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        ids = np.arange(start, min(start + batch_size, stop))
        yield dataset.read(ids[np.asarray(rows)] if rows is not None
                           else np.array_split(ids, process_count)[process_index])
