"""Generation on the host side, the same for every backend: choosing the next token (greedy,
temperature, top-p with a seed), the token loop around a backend's KV-cache step, and printing a
growing token list as text.

Sampling runs in numpy on the last position's logits, so a seed gives the same tokens on JAX and torch.
"""
from __future__ import annotations

import sys
from typing import Callable, Protocol, Sequence, TextIO

import numpy as np

from hammer.errors import HammerError


class SamplingError(HammerError):
    """A generation request that cannot run: bad sampling settings, an empty or too long prompt."""


class Sampler:
    """Picks a token from one position's logits: argmax at temperature 0, else a draw from the
    smallest set of most likely tokens whose probability reaches top_p (nucleus sampling)."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None):
        if not temperature >= 0:
            raise SamplingError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self._rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits, np.float64)
        if self.temperature == 0:
            return int(np.argmax(logits))
        z = logits / self.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        keep = np.arange(len(probs))
        if self.top_p < 1:  # sorting the vocabulary costs more than the rest of a draw: only for a nucleus
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep every token up to and including the one that brings the mass to top_p.
            keep = order[: int(np.searchsorted(cumulative, self.top_p * cumulative[-1])) + 1]
        kept = np.cumsum(probs[keep])
        return int(keep[min(np.searchsorted(kept, self._rng.random() * kept[-1], side="right"),
                            len(keep) - 1)])


def generate(step: Callable[[Sequence[int]], np.ndarray], prompt_ids: Sequence[int], *,
             max_new_tokens: int, sampler: Sampler, eos_id: int | None,
             on_token: Callable[[int], None] | None = None,
             stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """New token ids after `prompt_ids`, EOS included when it ends them; `stop(new)` true after a
    token ends them there too (a stop string reached).

    `step(ids)` runs `ids` through the model after everything it has seen (the prompt in one call,
    then one token a call) and returns the logits of the last of them.
    """
    if not prompt_ids:
        raise SamplingError("the prompt has no tokens")
    new: list[int] = []
    logits = step(prompt_ids)
    while len(new) < max_new_tokens:
        token = sampler(logits)
        new.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos_id or len(new) == max_new_tokens or (stop is not None and stop(new)):
            break
        logits = step([token])
    return new


def check_context(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    """Refuses a request that would run past the positions the model was trained on."""
    if max_new_tokens < 1:
        raise SamplingError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_tokens + max_new_tokens > context:
        raise SamplingError(f"the prompt's {prompt_tokens} tokens + {max_new_tokens} new tokens = "
                         f"{prompt_tokens + max_new_tokens} exceed the model's context of {context} "
                         f"(max_position_embeddings); shorten the prompt or lower --max-new-tokens")


class Decodes(Protocol):
    def decode(self, ids) -> str: ...


class TextStream:
    """Writes the text of a growing id list as it grows.

    Decoding the whole list each time and writing only the new suffix keeps SentencePiece's
    spacing right; text ending in U+FFFD is held back, since a character split over byte-fallback
    pieces decodes to U+FFFD until its last byte arrives.
    """

    def __init__(self, tokenizer: Decodes, out: TextIO = sys.stdout, ids: Sequence[int] = ()):
        self.tokenizer, self.out = tokenizer, out
        self.ids = list(ids)
        self.written = 0

    def add(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._write(text)

    def flush(self) -> None:
        self._write(self.tokenizer.decode(self.ids))

    def _write(self, text: str) -> None:
        if len(text) > self.written:
            self.out.write(text[self.written:])
            self.out.flush()
            self.written = len(text)
