"""Perplexity as lm-evaluation-harness measures it (`hammer eval --mode rolling`): the quantity its
wikitext-style tasks (`loglikelihood_rolling`) report, so a hammer number compares with a published one.

Unlike Skywork's setting (`hammer.eval`, the default), every token of a document is scored, the first
conditioned on BOS, the whole text is read (documents longer than the model's context are scored in
lm-eval's rolling windows, each window the model's context long), and bits per byte, byte perplexity
and word perplexity divide the total NLL by the UTF-8 bytes and the whitespace-separated words of the
whole text. The windows, the counts and the aggregations are lm-eval's own functions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from lm_eval.api.instance import Instance
from lm_eval.api.metrics import bits_per_byte, weighted_perplexity
from lm_eval.api.task import ConfigurableTask

from hammer.eval import EvalError
from hammer.lmeval import HammerLM


@dataclass(frozen=True)
class RollingDomain:
    name: str
    documents: int
    tokens: int  # every token of every document is scored
    nll: float  # total, in nats
    bytes: int
    words: int
    document_loglikelihoods: tuple[float, ...]

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        return bits_per_byte([(-self.nll, self.bytes)])

    @property
    def byte_perplexity(self) -> float:
        return weighted_perplexity([(-self.nll, self.bytes)])

    @property
    def word_perplexity(self) -> float:
        return weighted_perplexity([(-self.nll, self.words)])

    def to_json(self) -> dict:
        return {"documents": self.documents, "tokens": self.tokens, "nll": self.nll, "bytes": self.bytes,
                "words": self.words, "loss": self.loss, "ppl": self.ppl, "bits_per_byte": self.bits_per_byte,
                "byte_perplexity": self.byte_perplexity, "word_perplexity": self.word_perplexity}


def evaluate_rolling(lm: HammerLM, domains: Mapping[str, Sequence[str]]) -> dict[str, RollingDomain]:
    """Scores every domain's documents whole, as lm-eval's `loglikelihood_rolling` does."""
    if not domains:
        raise EvalError("no eval domains given")
    results = {}
    for name, docs in domains.items():
        tokens = sum(len(lm.tok_encode(d)) for d in docs)
        if tokens == 0:
            raise EvalError(f"domain {name!r}: no document has a token to score")
        requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=0) for d in docs]
        lls = lm.loglikelihood_rolling(requests)
        results[name] = RollingDomain(
            name, len(docs), tokens, -math.fsum(lls), sum(ConfigurableTask.count_bytes(d) for d in docs),
            sum(ConfigurableTask.count_words(d) for d in docs), tuple(lls))
    return results


def table(results: Mapping[str, RollingDomain]) -> str:
    lines = [f"{'domain':<16}{'docs':>7}{'tokens':>11}{'loss':>9}{'bits/byte':>11}{'byte ppl':>11}{'word ppl':>13}"]
    for d in results.values():
        lines.append(f"{d.name:<16}{d.documents:>7}{d.tokens:>11}{d.loss:>9.4f}{d.bits_per_byte:>11.4f}"
                     f"{d.byte_perplexity:>11.4f}{d.word_perplexity:>13.3f}")
    return "\n".join(lines)
