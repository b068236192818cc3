"""Per-token NLL of torch models for the eval harness (`hammer.eval.Scorer`): the twin, or any HF
model directory through transformers; and whether each token is the model's greedy choice (lm-eval's
`is_greedy`).

The head is applied a slice of positions at a time, so a batch of HammerLLM's 105789-way float32
logits (3.5 GB for 4 x 2048 positions) never exists at once.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hammer.eval import LOGITS_BUDGET


class TorchScorer:
    """Scores with `features(ids) -> hidden [b, s, h]` followed by `head(hidden) -> logits`."""

    fixed_shapes = False  # eager torch takes any shape at no cost

    def __init__(self, features: Callable[[torch.Tensor], torch.Tensor],
                 head: Callable[[torch.Tensor], torch.Tensor], *, vocab_size: int, max_length: int,
                 device: torch.device | str = "cpu", logits_budget: int = LOGITS_BUDGET):
        self._features, self._head, self.logits_budget = features, head, logits_budget
        self.vocab_size, self.max_length, self.device = vocab_size, max_length, torch.device(device)

    @classmethod
    def from_twin(cls, model: torch.nn.Module) -> "TorchScorer":
        """The hammer_torch Llama (its `features` and `head`), with its current weights."""
        device = next(model.parameters()).device
        return cls(model.features, model.head, vocab_size=model.config.vocab_size,
                   max_length=model.config.max_position_embeddings, device=device)

    @classmethod
    def from_hf(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu", logits_budget: int = LOGITS_BUDGET) -> "TorchScorer":
        """Any causal LM directory transformers loads (weights only: no remote code runs)."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        decoder = model.get_decoder()

        def features(ids: torch.Tensor) -> torch.Tensor:
            return decoder(input_ids=ids, use_cache=False).last_hidden_state

        config = model.config
        return cls(features, model.get_output_embeddings(), vocab_size=config.vocab_size,
                   max_length=config.max_position_embeddings, device=device, logits_budget=logits_budget)

    def token_nll(self, input_ids: np.ndarray) -> np.ndarray:
        return self.token_scores(input_ids)[0]

    @torch.inference_mode()
    def token_scores(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`token_nll`'s float32 `[b, s-1]`, and bool `[b, s-1]`: ids[j+1] is the argmax after ids[:j+1]."""
        ids = torch.from_numpy(np.asarray(input_ids, np.int64)).to(self.device)
        b, s = ids.shape
        hidden = self._features(ids)[:, :-1]
        targets = ids[:, 1:]
        step = max(1, self.logits_budget // (b * self.vocab_size))
        nll = torch.empty(b, s - 1, dtype=torch.float32, device=self.device)
        greedy = torch.empty(b, s - 1, dtype=torch.bool, device=self.device)
        for i in range(0, s - 1, step):
            logits = self._head(hidden[:, i:i + step]).float()
            t = targets[:, i:i + step]
            nll[:, i:i + step] = F.cross_entropy(logits.flatten(0, 1), t.flatten(), reduction="none").view(b, -1)
            greedy[:, i:i + step] = logits.argmax(dim=-1) == t
        return nll.cpu().numpy(), greedy.cpu().numpy()
