"""Causal attention over [batch, seq, heads, head_dim] tensors, by one of three kernels.

- `flash_attn`: FlashAttention-2 from the flash-attn package (what HammerLLM trained with); CUDA and
  bfloat16/float16 only; grouped-query attention native.
- `sdpa`: `F.scaled_dot_product_attention` with `enable_gqa` (no K/V copies); on CUDA the caller
  enters `sdpa_context`, which allows only the FlashAttention-2 backend, so it needs a half dtype there.
- `eager`: the reference math, softmax in float32.

Queries are the last `t` of the `s` key positions (a prefill, or new tokens after a KV cache), so the
causal mask is aligned to the bottom right.

Document masking (packed documents, `segment_ids` (B, T), self-attention without a cache): a query
attends only to earlier keys of its own segment. flash_attn runs each document as a sequence of
its own (`flash_attn_varlen_func`); sdpa and eager take the block-causal mask. On CUDA, sdpa is
restricted to FlashAttention-2, which takes no mask, so it refuses document masking.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from hammer.errors import HammerError

log = logging.getLogger(__name__)

IMPLS = ("flash_attn", "sdpa", "eager")
_HALF = (torch.bfloat16, torch.float16)


class AttentionUnavailableError(HammerError):
    """An explicitly requested attention kernel cannot run on these inputs (a setting the user can change)."""


def unavailable_reason(impl: str, device: torch.device, dtype: torch.dtype,
                       head_dim: int | None = None, document_mask: bool = False) -> str | None:
    """Why `impl` cannot run on `device`/`dtype` at this head size (with document masking), or
    None when it can."""
    if impl == "flash_attn":
        if device.type != "cuda" or dtype not in _HALF:
            return f"flash_attn needs CUDA bfloat16/float16 inputs, got {device.type} {dtype}"
        limit = _flash_limit(device, head_dim)
        if limit:
            return f"flash_attn {limit}"
        try:
            import flash_attn  # noqa: F401
        except ImportError as e:
            return f"flash_attn needs the flash-attn package (pip install flash-attn): {e}"
        return None
    if impl == "sdpa":
        if device.type == "cuda" and dtype not in _HALF:
            return (f"sdpa on CUDA runs only the FlashAttention-2 backend, which needs bfloat16/float16, "
                    f"got {dtype}; use attn_impl='eager' for float32")
        limit = _flash_limit(device, head_dim) if device.type == "cuda" else None
        if limit:
            return f"sdpa's FlashAttention-2 backend {limit}"
        if document_mask and device.type == "cuda":
            return ("sdpa on CUDA runs only the FlashAttention-2 backend, which takes no document mask; "
                    "use attn_impl='flash_attn' (varlen) or 'eager'")
        return None
    if impl == "eager":
        return None
    raise ValueError(f"attn_impl must be one of auto, {', '.join(IMPLS)}; got {impl!r}")


def _flash_limit(device: torch.device, head_dim: int | None) -> str | None:
    """FlashAttention-2's own limits, checked before the first forward would fail inside the kernel:
    Ampere (sm80) or newer, head size a multiple of 8 up to 256. Without a CUDA runtime there is no
    GPU to ask: the first forward fails on its own."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"needs an sm80+ GPU (Ampere or newer), this one is sm{major}{minor}"
    if head_dim is not None and (head_dim > 256 or head_dim % 8):
        return f"needs a head size that is a multiple of 8 up to 256, got {head_dim}"
    return None


def resolve(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int | None = None,
            document_mask: bool = False) -> str:
    """The kernel to run: `requested` if it can run, else an error; for "auto" the first that can.

    On a GPU, "auto" ending at eager is warned about: float32 scores of every head are materialized
    (~4 GB per layer at 8 x 2048), which a flash kernel never holds."""
    if requested == "auto":
        reasons = {}
        for impl in IMPLS:
            reasons[impl] = unavailable_reason(impl, device, dtype, head_dim, document_mask)
            if reasons[impl] is None:
                log.info("attention: %s (auto, %s %s)", impl, device.type, dtype)
                if impl == "eager" and device.type == "cuda":
                    # One message per cause: the warnings registry then shows it once.
                    warnings.warn("attention falls back to eager on a GPU (" + "; ".join(
                        reasons[i] for i in IMPLS if reasons[i]) + "); it holds every score matrix",
                        stacklevel=2)
                return impl
    reason = unavailable_reason(requested, device, dtype, head_dim, document_mask)
    if reason is not None:
        raise AttentionUnavailableError(f"attn_impl={requested!r} is unavailable: {reason}")
    return requested


def sdpa_context(impl: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Entered around the layers, outside compiled code, so that traced SDPA sees the same backends."""
    if impl == "sdpa" and device.type == "cuda":
        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str,
           segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """q (B, T, H, D), k/v (B, S, KVH, D) with S >= T -> (B, T, H, D), causal, bottom-right aligned;
    with segment_ids (B, T) (S == T), within each segment only."""
    t, s = q.shape[1], k.shape[1]
    if impl == "flash_attn":
        if segment_ids is not None:
            return _flash_varlen(q, k, v, segment_ids)
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, causal=True)  # bottom-right aligned when T < S
    if impl == "sdpa":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
        if segment_ids is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(segment_ids),
                                                 enable_gqa=True)
        elif t == s:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif t == 1:  # one new token sees the whole cache
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            # Imported here: torch.nn.attention.bias imports torch._dynamo, 2.6 s at every start.
            from torch.nn.attention.bias import causal_lower_right

            out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(t, s),
                                                 enable_gqa=True)
        return out.transpose(1, 2)
    if impl == "eager":
        return _eager(q, k, v, segment_ids)
    raise ValueError(f"attn_impl must be resolved to one of {IMPLS}, got {impl!r}")


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean, True where a query may attend: an earlier or the same position of its
    own segment."""
    t = segment_ids.shape[1]
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return same & torch.ones(t, t, dtype=torch.bool, device=segment_ids.device).tril()


def document_offsets(segment_ids: torch.Tensor) -> torch.Tensor:
    """flash-attn's cu_seqlens of packed rows (B, T) of segment ids: int32 offsets of every
    document in the rows' concatenation (a row's start starts one), then B * T."""
    b, t = segment_ids.shape
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::t] = True
    end = torch.tensor([b * t], dtype=torch.int32, device=flat.device)
    return torch.cat([starts.nonzero().flatten().to(torch.int32), end])


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Each document of each row as a sequence of its own (`document_offsets`). max_seqlen is the
    block length, an upper bound, so that nothing is read back from the device for it."""
    from flash_attn import flash_attn_varlen_func

    b, t, heads, d = q.shape
    cu_seqlens = document_offsets(segment_ids)
    out = flash_attn_varlen_func(q.reshape(b * t, heads, d), k.reshape(b * t, -1, d),
                                 v.reshape(b * t, -1, d), cu_seqlens, cu_seqlens, t, t, causal=True)
    return out.reshape(b, t, heads, d)


def _eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    t, s = q.shape[1], k.shape[1]
    group = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    if segment_ids is None:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(diagonal=s - t)
    else:
        mask = document_mask(segment_ids)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bhts,bshd->bthd", probs, v)
