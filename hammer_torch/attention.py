"""Causal attention over [batch, seq, heads, head_dim] tensors, by one of three kernels.

- `flash_attn`: FlashAttention-2 from the flash-attn package (what HammerLLM trained with); CUDA and
  bfloat16/float16 only; grouped-query attention native.
- `sdpa`: `F.scaled_dot_product_attention` with `enable_gqa` (no K/V copies); on CUDA the caller
  enters `sdpa_context`, which allows only the FlashAttention-2 backend, so it needs a half dtype there.
- `eager`: the reference math, softmax in float32.

Queries are the last `t` of the `s` key positions (a prefill, or new tokens after a KV cache), so the
causal mask is aligned to the bottom right.
"""
from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

log = logging.getLogger(__name__)

IMPLS = ("flash_attn", "sdpa", "eager")
_HALF = (torch.bfloat16, torch.float16)


class AttentionUnavailableError(RuntimeError):
    """An explicitly requested attention kernel cannot run on these inputs."""


def unavailable_reason(impl: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `impl` cannot run on `device`/`dtype`, or None when it can."""
    if impl == "flash_attn":
        if device.type != "cuda" or dtype not in _HALF:
            return f"flash_attn needs CUDA bfloat16/float16 inputs, got {device.type} {dtype}"
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            return f"flash_attn needs the flash-attn package (pip install flash-attn): {e}"
        return None
    if impl == "sdpa":
        if device.type == "cuda" and dtype not in _HALF:
            return (f"sdpa on CUDA runs only the FlashAttention-2 backend, which needs bfloat16/float16, "
                    f"got {dtype}; use attn_impl='eager' for float32")
        return None
    if impl == "eager":
        return None
    raise ValueError(f"attn_impl must be one of auto, {', '.join(IMPLS)}; got {impl!r}")


def resolve(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel to run: `requested` if it can run, else an error; for "auto" the first that can."""
    if requested == "auto":
        for impl in IMPLS:
            if unavailable_reason(impl, device, dtype) is None:
                log.info("attention: %s (auto, %s %s)", impl, device.type, dtype)
                return impl
    reason = unavailable_reason(requested, device, dtype)
    if reason is not None:
        raise AttentionUnavailableError(f"attn_impl={requested!r} is unavailable: {reason}")
    return requested


def sdpa_context(impl: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Entered around the layers, outside compiled code, so that traced SDPA sees the same backends."""
    if impl == "sdpa" and device.type == "cuda":
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, S, KVH, D) with S >= T -> (B, T, H, D), causal, bottom-right aligned."""
    t, s = q.shape[1], k.shape[1]
    if impl == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, causal=True)  # bottom-right aligned when T < S
    if impl == "sdpa":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
        if t == s:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif t == 1:  # one new token sees the whole cache
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, s),
                                                 enable_gqa=True)
        return out.transpose(1, 2)
    if impl == "eager":
        return _eager(q, k, v)
    raise ValueError(f"attn_impl must be resolved to one of {IMPLS}, got {impl!r}")


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    t, s = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bhts,bshd->bthd", probs, v)
