"""One optimizer step of the torch trainer, and the engines it runs on: DDP over the loss module,
AdamW partitioned by ZeRO-1, bf16 autocast. The learning rate comes with each step (the loop
evaluates `hammer.schedule`, the one definition both backends use).

With spike_skip, a step whose loss is a spike (`hammer.spikes`, decided on the device from the
loss all ranks agree on) leaves the parameters and AdamW's state unchanged: AdamW runs fused and
is handed the decision as `found_inf`, the flag through which GradScaler makes the fused kernel
skip a step (parameters, moments and the step count stay). The schedule moves on, as in the JAX
trainer. The window of losses is `SpikeWindow`, saved with the trainer state.

`hammer_torch.train` loops over `TrainStep.__call__`; bench/train_throughput.py times the very same.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from hammer.config import ConfigError
from hammer.data.loader import documents
from hammer.spikes import is_spike
from hammer.train_config import TrainConfig
from hammer.weight_decay import decays
from hammer_torch.loss import CausalLMLoss
from hammer_torch.model import Block, Llama


@dataclass
class SpikeWindow:
    """The losses of the last applied steps (a ring, float64 on the device), how many steps were
    applied and how many skipped: what the spike decision reads, saved with the trainer state."""
    losses: torch.Tensor
    filled: torch.Tensor
    skipped: torch.Tensor

    @classmethod
    def empty(cls, size: int, device: torch.device) -> "SpikeWindow":
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return cls(torch.zeros(size, dtype=torch.float64, device=device), zero, zero.clone())

    def to_dict(self) -> dict:
        return {"losses": self.losses.tolist(), "filled": int(self.filled), "skipped": int(self.skipped)}

    def load(self, saved: dict) -> None:
        self.losses.copy_(torch.tensor(saved["losses"], dtype=torch.float64))
        self.filled.fill_(int(saved["filled"]))
        self.skipped.fill_(int(saved["skipped"]))


@dataclass
class TrainStep:
    model: Llama  # float32 master weights, HF names
    loss_module: CausalLMLoss  # the model with its loss as forward, compiled as configured
    ddp: DistributedDataParallel
    optimizer: ZeroRedundancyOptimizer
    autocast: torch.autocast
    grad_accum: int
    max_grad_norm: float
    spikes: SpikeWindow | None = None  # with spike_skip
    spike_sigmas: float = 0.0

    def __call__(self, rows: torch.Tensor | tuple[torch.Tensor, ...], lr: float
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One update at learning rate `lr` from this rank's rows of a global batch (int64
        `[B / P, T]` on the device, or `step_rows`' tuple: (ids,) or with document masking (ids,
        segment ids, positions)): (this rank's mean cross-entropy as a float64 tensor, the global
        gradient norm before clipping, more metrics: "z_loss" (this rank's z-loss term, float64)
        with z_loss, "skipped" (steps skipped so far) with spike_skip). Nothing is read back from
        the device."""
        rows = rows if isinstance(rows, tuple) else (rows,)
        micro_batches = list(zip(*(x.chunk(self.grad_accum) for x in rows)))
        sums = torch.zeros(2, dtype=torch.float64, device=rows[0].device)  # cross-entropy, z-loss
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1  # gradients are all-reduced once, after the last backward
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                with self.autocast:
                    loss, z = self.ddp(*micro)
                ((loss + z) / self.grad_accum).backward()
            sums += torch.stack([loss.detach(), z.detach()]).double()
        means = sums / self.grad_accum
        # After the all-reduce every rank holds the full mean gradient: its norm is the global one.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), self.max_grad_norm or math.inf)
        for group in self.optimizer.param_groups:  # ZeRO-1 passes them to its local AdamW
            group["lr"] = lr
        metrics = {"z_loss": means[1]} if self.loss_module.z_loss else {}
        if self.spikes is None:
            self.optimizer.step()
        else:
            metrics["skipped"] = self._step_unless_spike(means.sum())
        self.optimizer.zero_grad(set_to_none=True)
        return means[0], grad_norm, metrics

    def _step_unless_spike(self, rank_loss: torch.Tensor) -> torch.Tensor:
        """The optimizer step, skipped on the device when the mean loss of all ranks is a spike."""
        loss = rank_loss.clone()
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
        window = self.spikes
        spike = is_spike(loss, window.losses, window.filled, self.spike_sigmas, torch)
        local = self.optimizer.optim  # ZeRO-1's AdamW over this rank's partition
        local.found_inf = spike.float()
        try:
            self.optimizer.step()
        finally:
            del local.found_inf
        slot = (window.filled % window.losses.numel()).view(1)
        kept = window.losses.index_select(0, slot)
        window.losses.index_copy_(0, slot, torch.where(spike, kept, loss.view(1)))
        window.filled += (~spike).long()
        window.skipped += spike.long()
        return window.skipped.clone()


def step_rows(rows: np.ndarray, device: torch.device, bos_id: int | None) -> tuple[torch.Tensor, ...]:
    """The step's input from this rank's `rows` of token ids, int64 on `device`: (ids,), or with
    document masking (`bos_id` set) (ids, segment ids, positions)."""
    arrays = (rows,) if bos_id is None else (rows, *documents(rows, bos_id))
    return tuple(torch.from_numpy(x.astype(np.int64)).to(device) for x in arrays)


def build(config: TrainConfig, model: Llama, device: torch.device) -> TrainStep:
    """The step of `config` for `model` (moved to `device`) inside a process group."""
    model.to(device)
    loss_module = _prepared(CausalLMLoss(model, config.loss_chunk, config.z_loss), config, device)
    ddp = DistributedDataParallel(loss_module, device_ids=[device] if device.type == "cuda" else None)
    optimizer = _optimizer(model, config, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16")
    grad_accum = 1 if config.grad_accum == "auto" else config.grad_accum  # auto: fit_grad_accum
    spikes = SpikeWindow.empty(config.spike_window, device) if config.spike_skip else None
    return TrainStep(model, loss_module, ddp, optimizer, autocast, grad_accum, config.max_grad_norm,
                     spikes, config.spike_sigmas)


def fit_grad_accum(step: TrainStep, config: TrainConfig, block_size: int, device: torch.device) -> int:
    """`grad_accum = "auto"`: the fewest micro-batches whose step fits the device, from a trial
    forward and backward of each candidate's micro-batch (largest first) plus what the trial does
    not allocate: DDP's gradient buckets and this rank's ZeRO-1 share of AdamW's two moments."""
    world = dist.get_world_size()
    limit = int(config.memory_limit_gb * 2**30) or torch.cuda.mem_get_info(device)[1]
    numel = sum(p.numel() for p in step.model.parameters())
    untried = 4 * numel + 2 * 4 * numel // world
    rows, tried = config.batch_size // world, []
    for accum in range(1, rows + 1):
        if rows % accum:
            continue
        torch.cuda.reset_peak_memory_stats(device)
        ids = torch.zeros((rows // accum, block_size), dtype=torch.int64, device=device)
        try:
            with step.autocast:
                loss, z = step.loss_module(ids)
            (loss + z).backward()
            need = torch.cuda.max_memory_allocated(device) + untried
        except torch.OutOfMemoryError:
            need = math.inf
        del ids
        step.model.zero_grad(set_to_none=True)
        if need <= limit:
            print(f"grad_accum = auto: {accum} micro-batches of {rows // accum} sequences a rank, "
                  f"{need / 2**20:.1f} MiB of {limit / 2**20:.1f} MiB", file=sys.stderr)
            return accum
        tried.append(f"{rows // accum} sequences: {need / 2**20:.1f} MiB")
    raise ConfigError(f"grad_accum = 'auto': no micro-batch fits {limit / 2**20:.1f} MiB "
                      f"({'; '.join(tried)}); lower batch_size, add devices or set remat = 'full'")


def _prepared(loss_module: CausalLMLoss, config: TrainConfig, device: torch.device) -> CausalLMLoss:
    """Activation checkpointing, then compilation, in place (state-dict keys stay HF's)."""
    if config.remat == "full":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing)

        apply_activation_checkpointing(loss_module, check_fn=lambda m: isinstance(m, Block))
    mode = config.compile if config.compile != "auto" else ("blocks" if device.type == "cuda" else "none")
    if mode == "blocks":
        loss_module.model.compile_blocks()
    elif mode == "model":
        loss_module.compile()
    return loss_module


def _optimizer(model: Llama, config: TrainConfig, device: torch.device) -> ZeroRedundancyOptimizer:
    """AdamW, its state partitioned across ranks (ZeRO-1), decaying what `hammer.weight_decay` says.
    Fused on CUDA, and wherever spike skipping needs the fused kernel's `found_inf`."""
    params = dict(model.named_parameters())  # a tied head appears once
    groups = [{"params": [p for n, p in params.items() if decays(n)], "weight_decay": config.weight_decay},
              {"params": [p for n, p in params.items() if not decays(n)], "weight_decay": 0.0}]
    return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=config.lr,
                                   betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                                   fused=device.type == "cuda" or config.spike_skip)


@contextlib.contextmanager
def process_group() -> Iterator[torch.device]:
    """torch.distributed from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...), or a group
    of one without torchrun: one code path, DDP and ZeRO-1 included, whatever the world size.
    Yields this process's device (NCCL on GPUs, gloo on CPU)."""
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group(backend, device_id=device if cuda else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield device
    finally:
        dist.destroy_process_group()
