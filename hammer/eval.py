"""Perplexity and bits per byte on named domain sets, in Skywork's setting (which HammerLLM followed).

Each document is cut to its first `max_tokens // 3` characters, tokenized with the model's own
tokenizer without special tokens and truncated at `max_tokens` ids. Its NLL is summed over positions
2..n (the first token has no context and is never scored). A domain's loss is its total NLL over its
scored tokens; ppl = exp(loss); the average over domains is exp(mean of the domain losses). Skywork
compares models with different tokenizers by dividing the same total NLL by the number of tokens a
reference tokenizer makes of the same texts (`loss_norm`). Bits per byte divides the NLL by the UTF-8
bytes of the same scored tokens instead, which needs no reference at all: the bytes each token after
the first stands for (`Tokenizer.piece_bytes`: a byte-fallback piece is one byte, a text piece its
UTF-8 length with `▁` as a space), so the first token's bytes, like its NLL, are left out.

Backends plug in through `Scorer`; this module never imports jax or torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np

from hammer.errors import HammerError

DEFAULT_MAX_TOKENS = 4096
DEFAULT_BATCH_SIZE = 8
# Float32 logits a scorer keeps alive at once, in elements (256 MiB): it runs the head over
# slices of positions, so a 105789-word vocab never needs all of a batch's logits.
LOGITS_BUDGET = 1 << 26
# For scorers with fixed shapes, padded lengths come from this ladder (powers of two and 1.5x), so a
# jitted scorer compiles a handful of shapes and no batch wastes more than a third of its positions.
_MIN_BUCKET = 16


class EvalError(HammerError):
    """Eval inputs that cannot be scored: no domains, a domain with nothing to score, bad sizes."""


class Scorer(Protocol):
    """A causal LM seen as a function from token ids to per-token NLL."""

    @property
    def max_length(self) -> int:
        """The longest sequence the model takes (its context)."""

    @property
    def fixed_shapes(self) -> bool:
        """True when every new batch shape costs a compilation (jit): batches then come in few shapes."""

    def token_nll(self, input_ids: np.ndarray) -> np.ndarray:
        """int32 `[b, s]` right-padded ids -> float32 `[b, s-1]`, entry j = -log p(ids[j+1] | ids[:j+1]).

        Attention is causal, so padding to the right of a document never reaches its positions and
        scorers need no mask; the harness drops the padded entries.
        """


class EncodesText(Protocol):
    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]: ...

    def decode(self, ids) -> str: ...

    @property
    def piece_bytes(self) -> np.ndarray: ...


@dataclass(frozen=True)
class DomainResult:
    name: str
    documents: int
    scored_tokens: int  # sum over documents of (tokens - 1)
    nll: float  # total, in nats
    bytes: int  # UTF-8 bytes the scored tokens (each document's after the first) stand for
    truncated_documents: int  # documents whose ids were cut at max_tokens (or the model's context)
    reference_tokens: int | None = None

    @property
    def loss(self) -> float:
        return self.nll / self.scored_tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    @property
    def loss_norm(self) -> float | None:
        return None if self.reference_tokens is None else self.nll / self.reference_tokens

    @property
    def ppl_norm(self) -> float | None:
        return None if self.loss_norm is None else math.exp(self.loss_norm)

    def to_json(self) -> dict:
        return {"documents": self.documents, "scored_tokens": self.scored_tokens, "nll": self.nll,
                "bytes": self.bytes, "truncated_documents": self.truncated_documents,
                "loss": self.loss, "ppl": self.ppl, "bits_per_byte": self.bits_per_byte,
                "reference_tokens": self.reference_tokens, "loss_norm": self.loss_norm,
                "ppl_norm": self.ppl_norm}


@dataclass(frozen=True)
class EvalResult:
    domains: tuple[DomainResult, ...]
    max_tokens: int

    @property
    def average_loss(self) -> float:
        return float(np.mean([d.loss for d in self.domains]))

    @property
    def average_ppl(self) -> float:
        return math.exp(self.average_loss)

    @property
    def average_ppl_norm(self) -> float | None:
        norms = [d.loss_norm for d in self.domains]
        return None if None in norms else math.exp(float(np.mean(norms)))

    def __getitem__(self, name: str) -> DomainResult:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(name)

    def to_json(self) -> dict:
        return {"max_tokens": self.max_tokens,
                "domains": {d.name: d.to_json() for d in self.domains},
                "average": {"loss": self.average_loss, "ppl": self.average_ppl,
                            "ppl_norm": self.average_ppl_norm}}

    def table(self) -> str:
        norm = self.average_ppl_norm is not None
        head = f"{'domain':<16}{'docs':>7}{'tokens':>11}{'loss':>9}{'ppl':>11}{'bits/byte':>11}"
        lines = [head + (f"{'ppl_norm':>11}" if norm else "")]
        for d in self.domains:
            line = (f"{d.name:<16}{d.documents:>7}{d.scored_tokens:>11}{d.loss:>9.4f}{d.ppl:>11.3f}"
                    f"{d.bits_per_byte:>11.4f}")
            lines.append(line + (f"{d.ppl_norm:>11.3f}" if norm else ""))
        avg = f"{'average':<16}{'':>7}{'':>11}{self.average_loss:>9.4f}{self.average_ppl:>11.3f}{'':>11}"
        lines.append(avg + (f"{self.average_ppl_norm:>11.3f}" if norm else ""))
        return "\n".join(lines)


def truncate(text: str, max_tokens: int) -> str:
    """Skywork's cut: the first max_tokens // 3 characters, so that ids rarely reach max_tokens."""
    return text[: max_tokens // 3]


def evaluate(scorer: Scorer, tokenizer: EncodesText, domains: Mapping[str, Sequence[str]], *,
             max_tokens: int = DEFAULT_MAX_TOKENS, batch_size: int = DEFAULT_BATCH_SIZE,
             reference_tokenizer: EncodesText | None = None) -> EvalResult:
    """Scores every domain's documents with `scorer`; ids come from `tokenizer`, the model's own."""
    if max_tokens < 6:
        raise EvalError(f"max_tokens must be >= 6 (two characters to score), got {max_tokens}")
    if batch_size < 1:
        raise EvalError(f"batch_size must be >= 1, got {batch_size}")
    if not domains:
        raise EvalError("no eval domains given")
    limit = min(max_tokens, scorer.max_length)
    results = []
    for name, docs in domains.items():
        texts = [truncate(t, max_tokens) for t in docs]
        ids = tokenizer.encode_batch(texts, add_special_tokens=False)
        cut = [i for i, doc in enumerate(ids) if len(doc) > limit]
        for i in cut:  # reference tokens then count the text of the ids kept
            ids[i] = ids[i][:limit]
            # A cut inside a character's byte-fallback pieces decodes to U+FFFD; that character is not kept.
            texts[i] = tokenizer.decode(ids[i]).rstrip("\ufffd")
        scored = sum(max(len(doc) - 1, 0) for doc in ids)
        if scored == 0:
            raise EvalError(f"domain {name!r}: no document has two tokens to score")
        nll = float(document_nll(scorer, ids, batch_size).sum())
        reference = None
        if reference_tokenizer is not None:
            reference = sum(len(r) for r in reference_tokenizer.encode_batch(texts, add_special_tokens=False))
        piece_bytes = tokenizer.piece_bytes
        n_bytes = int(sum(piece_bytes[doc[1:]].sum() for doc in ids))
        results.append(DomainResult(name, len(docs), scored, nll, n_bytes, len(cut), reference))
    return EvalResult(tuple(results), max_tokens)


def document_nll(scorer: Scorer, ids: Sequence[Sequence[int]], batch_size: int) -> np.ndarray:
    """Summed NLL of each document (float64), over its tokens after the first."""
    totals = np.zeros(len(ids), np.float64)
    for rows, batch, lengths in length_batches(ids, batch_size, scorer.max_length, scorer.fixed_shapes):
        nll = np.asarray(scorer.token_nll(batch), np.float64)
        if nll.shape != (batch.shape[0], batch.shape[1] - 1):
            raise ValueError(f"scorer returned NLL of shape {nll.shape} for ids of shape {batch.shape}, "
                             f"expected {(batch.shape[0], batch.shape[1] - 1)}")
        scored = np.arange(batch.shape[1] - 1)[None, :] < (lengths - 1)[:, None]
        totals[rows] = np.where(scored, nll, 0.0).sum(axis=1)[: len(rows)]
    return totals


def length_batches(ids: Sequence[Sequence[int]], batch_size: int, max_length: int, fixed_shapes: bool
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(document indices, right-padded int32 ids, lengths) for documents of >= 2 tokens, by length.

    Sorting by length keeps the padding small. With `fixed_shapes`, rows are padded to a power of
    two (at most batch_size) and lengths to the bucket ladder, so a jitted scorer sees few shapes;
    padding rows have length 0.
    """
    order = sorted((i for i, doc in enumerate(ids) if len(doc) >= 2), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = np.array(order[start:start + batch_size])
        width = longest = len(ids[rows[-1]])
        height = len(rows)
        if fixed_shapes:
            width = max(longest, min(bucket_length(longest), max_length))
            height = min(1 << (len(rows) - 1).bit_length(), batch_size)
        batch = np.zeros((height, width), np.int32)
        lengths = np.zeros(height, np.int64)
        for r, i in enumerate(rows):
            batch[r, : len(ids[i])] = ids[i]
            lengths[r] = len(ids[i])
        yield rows, batch, lengths


def bucket_length(n: int) -> int:
    """The smallest of 16, 24, 32, 48, 64, 96, ... (2^k and 1.5 * 2^k) that holds n."""
    size = _MIN_BUCKET
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2
