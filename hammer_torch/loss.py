"""Next-token cross-entropy that never holds the whole batch's logits.

For HammerLLM's batch (8 x 2048 tokens, vocabulary V = 105789) the float32 logits alone are
8·2048·105789·4 B = 6.93 GB. The plain path (bfloat16 head, `.float()`, `F.cross_entropy`) keeps
alive at the end of the forward pass the bfloat16 logits (3.47 GB), their float32 copy (6.93 GB) and
the log-softmax that cross-entropy saves for backward (6.93 GB): about 17.3 GB, and backward adds a
float32 gradient of the same 6.93 GB.

Here the tokens are split into chunks of `chunk_size`; each chunk runs head matmul + cross-entropy
under activation checkpointing, so only its inputs are kept and backward recomputes its logits. At
`chunk_size=1024` one chunk's transient logits are 1024·105789·(2+4+4) B = 1.08 GB, freed before
the next chunk: about 16 GB less peak memory for the loss, at the cost of one more head matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def chunked_cross_entropy(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of logits `features @ weight.T` (float32) against `targets`.

    features (..., H), weight (V, H), targets (...) with the leading shape of features; targets equal
    to `ignore_index` count neither in the sum nor in the mean.
    """
    return chunked_losses(features, weight, targets, chunk_size, ignore_index)[0]


def chunked_losses(features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int = 1024, ignore_index: int = IGNORE_INDEX,
                   z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, z_loss * mean(logsumexp(logits)^2)) as `chunked_cross_entropy` takes
    them; the z-loss term (PaLM's) comes from the same chunks' logits, and is a zero without
    computing anything when z_loss is 0."""
    if features.shape[:-1] != targets.shape:
        raise ValueError(f"features {tuple(features.shape)} and targets {tuple(targets.shape)} "
                         f"disagree on the token dimensions")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    features = features.reshape(-1, features.shape[-1])
    targets = targets.reshape(-1)
    count = (targets != ignore_index).sum()
    # Per-token losses (N floats, nothing next to N·V logits), averaged in float64: a float32 mean
    # is off by a few ulps (~1e-6 at a loss of 7), as much as the tolerance against plain CE.
    if not z_loss:
        losses = [checkpoint(_token_cross_entropy, h, weight, t, ignore_index, use_reentrant=False)
                  for h, t in zip(features.split(chunk_size), targets.split(chunk_size))]
        total = torch.cat(losses).sum(dtype=torch.float64)
        return (total / count).float(), torch.zeros((), device=features.device)
    pairs = [checkpoint(_token_losses, h, weight, t, ignore_index, use_reentrant=False)
             for h, t in zip(features.split(chunk_size), targets.split(chunk_size))]
    total = torch.cat([ce for ce, _ in pairs]).sum(dtype=torch.float64)
    squares = torch.cat([z for _, z in pairs]).sum(dtype=torch.float64)
    return (total / count).float(), (z_loss * squares / count).float()


def causal_lm_loss(model: torch.nn.Module, input_ids: torch.Tensor, chunk_size: int = 1024,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean loss of predicting input_ids[:, 1:] from the features of input_ids[:, :-1]."""
    return causal_lm_losses(model, input_ids, chunk_size, ignore_index=ignore_index)[0]


def causal_lm_losses(model: torch.nn.Module, input_ids: torch.Tensor, chunk_size: int = 1024,
                     z_loss: float = 0.0, segment_ids: torch.Tensor | None = None,
                     positions: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy, its z-loss term) of input_ids (`chunked_losses`); packed
    documents masked with segment_ids and positions (B, T) as `Llama.features` takes them."""
    if input_ids.ndim != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be (batch, seq) with seq >= 2, got {tuple(input_ids.shape)}")
    features = model.features(input_ids, segment_ids=segment_ids, positions=positions)
    return chunked_losses(features[:, :-1], model.lm_head.weight, input_ids[:, 1:], chunk_size,
                          ignore_index, z_loss)


class CausalLMLoss(torch.nn.Module):
    """The model with `causal_lm_losses` as its forward: the module a trainer wraps in DDP.

    `causal_lm_losses` reads the model's features and head weight itself; called on `ddp.module` it
    would skip `DDP.forward`, whose hooks are what all-reduce the gradients, and every rank would
    keep its own. Inside this forward the whole loss is DDP's computation."""

    def __init__(self, model: torch.nn.Module, chunk_size: int = 1024, z_loss: float = 0.0):
        super().__init__()
        self.model, self.chunk_size, self.z_loss = model, chunk_size, z_loss

    def forward(self, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy, z-loss term): the objective is their sum."""
        return causal_lm_losses(self.model, input_ids, self.chunk_size, self.z_loss, segment_ids,
                                positions)


def _token_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int) -> torch.Tensor:
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")


def _token_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and squared logsumexp (0 at ignored targets)."""
    logits = F.linear(h, weight).float()
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none")
    lse = torch.logsumexp(logits, dim=-1)
    return ce, torch.where(targets != ignore_index, lse * lse, 0.0)
