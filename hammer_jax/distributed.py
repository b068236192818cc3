"""A JAX run over many processes: joining them, and which rows of a batch each one reads.

`join` calls `jax.distributed.initialize` as the run's [distributed] table says, before any other
JAX call. Every process then sees all devices of the run; the coordinator (process 0) checks that
each process sends a heartbeat, and a process silent for `heartbeat_timeout` seconds (killed, its
host gone) makes every other process fail with an error rather than wait forever in a collective.

A process reads only the rows of each global batch that its own devices hold: `process_rows` asks
the batch's sharding, so a mesh whose axes span hosts in any order gets every row in its place, and
a process whose devices replicate the whole batch reads all of it.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

from hammer.train_config import DistributedConfig
from hammer_jax.train_step import batch_sharding


def detected_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
    """The multi-process cluster `jax.distributed.initialize()` would detect on its own, if any:
    a SLURM step of more than one task, Open MPI with more than one rank, or a Cloud TPU VM
    (libtpu installed; JAX reads the slice's workers from the TPU metadata, and a single-host
    slice is a cluster of one)."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(key in environ for key in slurm) and int(environ["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    return None


def join(config: DistributedConfig, environ: Mapping[str, str] = os.environ) -> bool:
    """Initializes JAX's distributed system when `config` says so; True when it did (or already
    had been). Call it before anything else touches JAX."""
    if jax.distributed.is_initialized():
        return True
    wanted = {"on": True, "off": False}.get(
        config.mode, bool(config.coordinator_address) or detected_cluster(environ) is not None)
    if not wanted:
        return False
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address or None,
        num_processes=config.num_processes or None,
        process_id=None if config.process_id == -1 else config.process_id,
        local_device_ids=list(config.local_device_ids) or None,
        initialization_timeout=config.initialization_timeout,
        heartbeat_timeout_seconds=config.heartbeat_timeout)
    return True


def process_rows(sharding: Sharding, shape: tuple[int, ...]) -> np.ndarray:
    """The rows (first-axis indices) of an array of `shape` under `sharding` that this process's
    devices hold, ascending: the order in which `jax.make_array_from_process_local_data` maps a
    process's local rows onto its shards."""
    held = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        held.update(range(shape[0])[index[0]])
    return np.array(sorted(held), np.int64)


class BatchPlacer:
    """This process's `rows` of each `[global_rows, block_size]` batch -> the global batch array,
    split over the mesh's data-parallel axes."""

    def __init__(self, mesh, global_rows: int, block_size: int):
        self.sharding = batch_sharding(mesh)
        self.shape = (global_rows, block_size)
        self.rows = process_rows(self.sharding, self.shape)

    def __call__(self, local: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self.sharding, local, self.shape)


def sync(name: str) -> None:
    """Waits until every process reaches the point called `name` (nothing to wait for alone)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (each must take the same branch around collectives)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.array(flag)).any())
