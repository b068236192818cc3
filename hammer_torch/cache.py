"""The KV cache for generation: per-layer key/value buffers and one length shared by the batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer (B, max_len, KVH, D)
    values: list[torch.Tensor]
    length: int = 0  # positions filled, the same for every sequence of the batch

    @classmethod
    def empty(cls, num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype, device: torch.device | str | None) -> "KVCache":
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(f"a KV cache needs batch_size and max_len > 0, got {batch_size}, {max_len}")
        shape = (batch_size, max_len, num_kv_heads, head_dim)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)])

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[1]
