"""One optimizer step of the torch trainer, and the engines it runs on: DDP over the loss module,
AdamW partitioned by ZeRO-1, bf16 autocast. The learning rate comes with each step (the loop
evaluates `hammer.schedule`, the one definition both backends use).

`hammer_torch.train` loops over `TrainStep.__call__`; bench/train_throughput.py times the very same.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from hammer.config import ConfigError
from hammer.train_config import TrainConfig
from hammer_torch.loss import CausalLMLoss
from hammer_torch.model import Block, Llama


@dataclass
class TrainStep:
    model: Llama  # float32 master weights, HF names
    loss_module: CausalLMLoss  # the model with its loss as forward, compiled as configured
    ddp: DistributedDataParallel
    optimizer: ZeroRedundancyOptimizer
    autocast: torch.autocast
    grad_accum: int
    max_grad_norm: float

    def __call__(self, rows: torch.Tensor, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One update at learning rate `lr` from this rank's rows of a global batch (int64
        `[B / P, T]` on the device): (this rank's mean loss as a float64 tensor, the global gradient
        norm before clipping). Nothing is read back from the device."""
        micro_batches = rows.chunk(self.grad_accum)
        loss_sum = torch.zeros((), dtype=torch.float64, device=rows.device)
        for i, ids in enumerate(micro_batches):
            last = i == len(micro_batches) - 1  # gradients are all-reduced once, after the last backward
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                with self.autocast:
                    loss = self.ddp(ids)
                (loss / self.grad_accum).backward()
            loss_sum += loss.detach().double()
        # After the all-reduce every rank holds the full mean gradient: its norm is the global one.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.ddp.parameters(), self.max_grad_norm or math.inf)
        for group in self.optimizer.param_groups:  # ZeRO-1 passes them to its local AdamW
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / self.grad_accum, grad_norm


def build(config: TrainConfig, model: Llama, device: torch.device) -> TrainStep:
    """The step of `config` for `model` (moved to `device`) inside a process group."""
    model.to(device)
    loss_module = _prepared(CausalLMLoss(model, config.loss_chunk), config, device)
    ddp = DistributedDataParallel(loss_module, device_ids=[device] if device.type == "cuda" else None)
    optimizer = _optimizer(model, config, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16")
    grad_accum = 1 if config.grad_accum == "auto" else config.grad_accum  # auto: fit_grad_accum
    return TrainStep(model, loss_module, ddp, optimizer, autocast, grad_accum, config.max_grad_norm)


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
                loss = step.loss_module(ids)
            loss.backward()
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
    """AdamW, its state partitioned across ranks (ZeRO-1); HF Trainer's decay grouping: the norm
    scales (every 1-d parameter of a Llama) are not decayed, matrices and embeddings are."""
    params = dict(model.named_parameters())  # a tied head appears once
    groups = [{"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}]
    return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=config.lr,
                                   betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                                   fused=device.type == "cuda")


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
