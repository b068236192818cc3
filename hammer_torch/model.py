"""The Llama of `hammer.config.ModelConfig` in PyTorch, with HF `LlamaForCausalLM` parameter names.

HammerLLM trained transformers' Llama with flash-attention 2 patched in and torch.compile; this is that
model as a module of its own: the kernel is an argument (`attention.py`), compilation is per block
and in place (`compile_blocks`), so state-dict keys stay HF's and an HF state dict loads strictly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hammer.config import ModelConfig
from hammer_torch import attention
from hammer_torch.cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the activation dtype; the scale applied after, as HF does.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (..., T, D) in float32 for integer positions (T,) or (B, T), halves duplicated
    (rotate_half layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32,
                                            device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) rotated in float32: bfloat16 cos/sin would blur the angles of far positions."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos[..., None, :] + rotated * sin[..., None, :]).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.q_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.kv_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.kv_size, bias=False)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str,
                kv: tuple[torch.Tensor, torch.Tensor] | None, start: int,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # write the new positions, attend to everything cached so far
            cache_k, cache_v = kv
            cache_k[:, start:start + t] = k
            cache_v[:, start:start + t] = v
            # A cache may be kept in a narrower dtype than the activations.
            k, v = cache_k[:, :start + t].to(q.dtype), cache_v[:, :start + t].to(q.dtype)
        out = attention.attend(q, k, v, impl, segment_ids)  # (B, T, H, D)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, impl: str,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0,
                segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, impl, kv, start, segment_ids)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config: ModelConfig, attn_impl: str = "auto"):
        super().__init__()
        if attn_impl not in ("auto", *attention.IMPLS):
            raise ValueError(f"attn_impl must be one of auto, {', '.join(attention.IMPLS)}; got {attn_impl!r}")
        self.config, self.attn_impl = config, attn_impl
        self._resolved: dict[tuple[str, torch.dtype, bool], str] = {}
        # A ModuleDict, not a class, only so that the names are HF's `model.*`.
        self.model = nn.ModuleDict(dict(
            # padding_idx as transformers sets it: the pad row gets no gradient from the lookup.
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size,
                                      padding_idx=config.pad_token_id),
            layers=nn.ModuleList(Block(config) for _ in range(config.num_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()
        self.tie_weights()
        self.register_load_state_dict_pre_hook(_fill_tied_head)

    def tie_weights(self) -> None:
        """With tie_word_embeddings the head is the embedding Parameter itself (one gradient)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_parameters(self) -> None:
        """HF's initialization: normal(0, initializer_range) matrices, a zero pad row, unit norm scales."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.initializer_range)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        if self.config.pad_token_id is not None:
            with torch.no_grad():
                self.model.embed_tokens.weight[self.config.pad_token_id].zero_()

    def compile_blocks(self, **compile_kwargs) -> "Llama":
        """torch.compile each block in place: the state-dict keys stay free of `_orig_mod.`."""
        for block in self.model.layers:
            block.compile(**compile_kwargs)
        return self

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab)."""
        return self.head(self.features(input_ids))

    def features(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                 segment_ids: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        """The hidden states after the final norm, (B, T, hidden). Packed documents: with
        segment_ids and positions (B, T) (`hammer.data.loader.documents`; no cache), each token
        attends only to its own document, at RoPE positions that restart with it."""
        start = self._check_input(input_ids, cache)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids mask packed documents in training; decoding with a KV cache takes none")
        x = self.model.embed_tokens(input_ids)
        impl = self._resolve_attention(x, document_mask=segment_ids is not None)
        if positions is None:
            positions = torch.arange(start, start + input_ids.shape[1], device=x.device)
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta)
        with attention.sdpa_context(impl, x.device):
            for i, block in enumerate(self.model.layers):
                kv = None if cache is None else (cache.keys[i], cache.values[i])
                x = block(x, cos, sin, impl, kv, start, segment_ids)
        return self.model.norm(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.lm_head(features)

    def init_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> KVCache:
        weight = self.model.embed_tokens.weight
        c = self.config
        return KVCache.empty(c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim,
                             dtype or weight.dtype, device or weight.device)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Runs input_ids (B, T) at positions cache.length.. against the cache, which it extends."""
        logits = self.head(self.features(input_ids, cache))
        cache.length += input_ids.shape[1]
        return logits

    def _check_input(self, input_ids: torch.Tensor, cache: KVCache | None) -> int:
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, seq) with seq > 0, got shape {tuple(input_ids.shape)}")
        if cache is None:
            return 0
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"input_ids batch {input_ids.shape[0]} != KV cache batch {cache.batch_size}")
        if cache.length + input_ids.shape[1] > cache.max_len:
            raise ValueError(f"{input_ids.shape[1]} new tokens after {cache.length} cached exceed the "
                             f"cache's max_len {cache.max_len}")
        return cache.length

    def _resolve_attention(self, x: torch.Tensor, document_mask: bool = False) -> str:
        dtype = (torch.get_autocast_dtype(x.device.type)
                 if torch.is_autocast_enabled(x.device.type) else x.dtype)
        key = (x.device.type, dtype, document_mask)
        if key not in self._resolved:
            self._resolved[key] = attention.resolve(self.attn_impl, x.device, dtype, self.config.head_dim,
                                                    document_mask)
        return self._resolved[key]


def _fill_tied_head(module: Llama, state_dict: dict, prefix: str, *_) -> None:
    """HF drops `lm_head.weight` from tied checkpoints; a tied twin takes it from the embedding."""
    if not module.config.tie_word_embeddings:
        return
    embed, head = prefix + "model.embed_tokens.weight", prefix + "lm_head.weight"
    if embed not in state_dict:
        return
    if head not in state_dict:
        state_dict[head] = state_dict[embed]
    elif not torch.equal(state_dict[head], state_dict[embed]):
        raise ValueError("the config ties word embeddings but the state dict's lm_head.weight "
                         "differs from model.embed_tokens.weight")
