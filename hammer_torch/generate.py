"""KV-cache decoding of the torch twin for `hammer.sampling.generate`: the prompt in one call, then
one token a call against the cache the twin fills in place."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


class TorchStepper:
    """`step(ids) -> last logits` over a cache of `max_len` positions, for a batch of one."""

    def __init__(self, model: torch.nn.Module, max_len: int):
        self.model, self.max_len = model.eval(), max_len
        self.reset()
        self.device = self.cache.keys[0].device

    def reset(self) -> None:
        """Forgets every token seen: the next call is a new prompt."""
        self.cache = self.model.init_cache(1, self.max_len)

    @torch.inference_mode()
    def __call__(self, ids: Sequence[int]) -> np.ndarray:
        logits = self.model.decode(torch.tensor([list(ids)], device=self.device), self.cache)
        return logits[0, -1].float().cpu().numpy()
