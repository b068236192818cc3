"""`grad_accum = "auto"` on the JAX backend: the fewest micro-batches whose compiled step fits the
device's memory, read from XLA's memory analysis of each candidate's compiled step, without
running one. Candidates split the global batch evenly and keep every micro-batch divisible over
the mesh's data-parallel devices; the largest micro-batch is tried first, so a batch that fits
whole costs one compilation (the one the trainer runs).
"""
from __future__ import annotations

import sys
from typing import Callable

import jax
import jax.numpy as jnp

from hammer.config import ConfigError


def step_bytes(compiled) -> int:
    """Bytes one device holds while the compiled step runs: its arguments, its outputs that do not
    reuse a donated argument's buffer, and its temporaries."""
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes + m.generated_code_size_in_bytes)


def device_limit(limit_gb: float) -> int:
    """The bytes a step may use: `memory_limit_gb` when set, else what the device reports."""
    if limit_gb:
        return int(limit_gb * 2**30)
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ConfigError(f"grad_accum = 'auto' needs memory_limit_gb on {jax.local_devices()[0].platform} "
                          f"devices, which report no memory limit")
    return int(stats["bytes_limit"])


def fit_grad_accum(compile_step: Callable[[int], object], batch_size: int, shards: int,
                   limit: int) -> tuple[int, object]:
    """(grad_accum, compiled step) of the fewest micro-batches whose step fits `limit` bytes;
    `compile_step(grad_accum)` compiles the step for that split."""
    tried = []
    for accum in range(1, batch_size + 1):
        if batch_size % accum or (batch_size // accum) % shards:
            continue
        compiled = compile_step(accum)
        need = step_bytes(compiled)
        if need <= limit:
            print(f"grad_accum = auto: {accum} micro-batches of {batch_size // accum} sequences, "
                  f"{need / 2**20:.1f} MiB of {limit / 2**20:.1f} MiB a device", file=sys.stderr)
            return accum, compiled
        tried.append(f"{batch_size // accum} sequences: {need / 2**20:.1f} MiB")
    raise ConfigError(f"grad_accum = 'auto': no micro-batch fits {limit / 2**20:.1f} MiB a device "
                      f"({'; '.join(tried)}); lower batch_size or seq, add devices or remat")


def abstract_batch(sharding, rows: int, block_size: int, bos: int | None = None):
    """The train step's batch as shapes: the ids, with their segment ids and positions when
    documents are masked (`bos` set)."""
    ids = jax.ShapeDtypeStruct((rows, block_size), jnp.int32, sharding=sharding)
    return ids if bos is None else (ids, ids, ids)
