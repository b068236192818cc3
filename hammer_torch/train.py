"""The torch twin's trainer: HammerLLM's CUDA path (HF Trainer + DeepSpeed ZeRO-1 + flash-attention 2
+ torch.compile, bf16) rebuilt from PyTorch's own engines, on the JAX trainer's config, schedule,
data order, run directory and metrics.

    hammer train --backend torch --config FILE [key=value ...]                  # one process
    torchrun --nproc_per_node=N -m hammer train --backend torch --config FILE   # N processes

One process per device (NCCL on GPUs, gloo on CPU); the data-parallel size is the world size. Each
rank reads its rows of every global batch and runs them as `grad_accum` micro-batches, gradients
accumulating without communication (`no_sync`) until the last, whose backward DDP all-reduces to the
mean. The loss is computed inside the DDP module's forward (`CausalLMLoss`). Gradients are then full
on every rank, so clipping at their global norm needs no communication; ZeRO-1
(`ZeroRedundancyOptimizer`) keeps on each rank only its part of AdamW's state, updates those
parameters and broadcasts them. Master weights and optimizer state are float32; `dtype = "bfloat16"`
runs forward under autocast, as HF Trainer's `--bf16` did (BUILD.md, "Mixed precision").
The step itself is `hammer_torch.train_step`; this module is the loop around it: data, resume, logs,
evaluation, checkpoints (`hammer_torch.train_checkpoint`), SIGTERM.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from hammer.config import ConfigError, ModelConfig
from hammer.data.loader import (Loader, LoaderState, document_bos, eval_batches, mixture_from_specs,
                                validation_sets)
from hammer.metrics import MetricsLog, TrainMeter, check_finite, peak_flops, perplexity
from hammer.run import CHECKPOINTS_DIR, check_init, check_inputs, data_fingerprint, open_run, sigterm_flag
from hammer.train_config import TrainConfig
from hammer_torch import train_checkpoint, train_step
from hammer_torch.checkpoint import from_tensors
from hammer_torch.loss import CausalLMLoss
from hammer_torch.model import Llama


def train(config: TrainConfig) -> Path:
    """Trains (or resumes) the run of `config`; returns its run directory."""
    if config.mesh.tensor != 1:
        raise ConfigError(f"mesh.tensor = {config.mesh.tensor}: the torch trainer is data parallel "
                          f"only (DDP + ZeRO-1); set mesh.tensor=1 or use backend=jax")
    if config.remat == "dots":
        raise ConfigError("remat = 'dots' is a JAX policy; the torch trainer takes none or full")
    model_config = config.model_config()
    bos = document_bos(config.document_mask, model_config.bos_token_id)
    mixture = mixture_from_specs(config.data)
    validation = validation_sets(config.validation) if config.validation else {}
    tokenizer = check_inputs(config, model_config, mixture, validation)  # saved with every checkpoint
    with train_step.process_group() as device:
        rank, world = dist.get_rank(), dist.get_world_size()
        config.mesh.resolve(world)  # any data x fsdp sizes that multiply to the world size
        if config.batch_size % (world * config.grad_accum):
            raise ConfigError(f"batch_size {config.batch_size} is not divisible by {world} processes x "
                              f"grad_accum {config.grad_accum}: every micro-batch must hold the same rows")
        if validation and config.eval_batch_size % world:
            raise ConfigError(f"eval_batch_size {config.eval_batch_size} is not divisible by {world} processes")
        model = _initial_model(config, model_config)
        run_dir = Path(config.output)
        if rank == 0:
            open_run(config, model_config, data_fingerprint(mixture))
        dist.barrier()
        return _train(config, model_config, model, mixture, validation, tokenizer, run_dir, device, bos)


def _train(config: TrainConfig, model_config: ModelConfig, model: Llama, mixture, validation,
           tokenizer, run_dir: Path, device: torch.device, bos: int | None) -> Path:
    rank, world = dist.get_rank(), dist.get_world_size()
    step_fn = train_step.build(config, model, device)
    optimizer, scheduler = step_fn.optimizer, step_fn.scheduler

    checkpoints = run_dir / CHECKPOINTS_DIR
    resumed = train_checkpoint.restore(checkpoints, model_config, model, optimizer, scheduler)
    step = resumed.step if resumed else 0
    if resumed and step_fn.spikes is not None:
        step_fn.spikes.load(resumed.spikes)
    loader = Loader(mixture, config.batch_size, seed=config.seed, step=step,
                    process_index=rank, process_count=world)
    if resumed:
        loader.restore(LoaderState.from_dict(resumed.loader))
        if rank == 0:
            print(f"resuming {run_dir} from step {step}", file=sys.stderr)
    meter = TrainMeter(config.batch_size * mixture.block_size,
                       model_config.flops_per_token(mixture.block_size), world,
                       peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                  config.peak_flops))

    metrics = MetricsLog(run_dir, step, tensorboard=config.tensorboard) if rank == 0 else None
    progress = tqdm(total=config.steps, initial=step, disable=rank != 0, desc="train", unit="step",
                    file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with sigterm_flag() as sigterm, contextlib.ExitStack() as closing:
        if metrics is not None:
            closing.enter_context(metrics)
        closing.callback(progress.close)
        while step < config.steps:
            rows = train_step.step_rows(next(loader), device, bos)
            began = time.perf_counter()
            rank_loss, grad_norm, lr, _ = step_fn(rows)
            # One all-reduce: the step's mean loss over every rank and whether any rank got SIGTERM.
            shared = torch.stack([rank_loss, torch.tensor(float(sigterm()), dtype=torch.float64,
                                                           device=device)])
            dist.all_reduce(shared)
            step_loss, stop = shared[0].item() / world, shared[1].item() > 0
            grad_norm = grad_norm.item()
            if not config.spike_skip:  # a skipped non-finite step changed nothing
                check_finite(step + 1, loss=step_loss, grad_norm=grad_norm)
            meter.add(step_loss, time.perf_counter() - began, lr, grad_norm)
            step += 1
            progress.update()

            if step % config.log_every == 0 or step == config.steps or stop:
                record = meter.record(step)
                if device.type == "cuda":
                    record["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                if metrics is not None:
                    metrics.write(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if validation and config.eval_every and step % config.eval_every == 0:
                domains = _evaluate(step_fn.loss_module, validation, config, step_fn.autocast, device, bos)
                if metrics is not None:
                    metrics.write({"step": step, "kind": "eval", "domains": domains})
            if step % config.checkpoint_every == 0 or step == config.steps or stop:
                train_checkpoint.save(checkpoints, train_checkpoint.TrainerState(
                    step, loader.state.to_dict(), step_fn.spikes.to_dict() if step_fn.spikes else None),
                    model, optimizer, scheduler,
                    config.keep_checkpoints, tokenizer)
            if stop:
                if rank == 0:
                    print(f"SIGTERM: saved step {step} in {checkpoints}; rerun the same command to "
                          f"resume", file=sys.stderr)
                break
    return run_dir


def _initial_model(config: TrainConfig, model_config: ModelConfig) -> Llama:
    """Random from `seed` (HF's init, the pad row zero), or the weights of `init`: an HF directory,
    a torch checkpoint (one) or a hammer JAX directory or training checkpoint (through convert)."""
    if not config.init:
        torch.manual_seed(config.seed)
        return Llama(model_config, attn_impl=config.attention_impl)
    import convert

    init_config, tensors = convert.read_checkpoint(config.init)
    check_init(config.init, init_config, model_config)
    model = from_tensors(model_config, convert.check_hf(tensors, model_config), torch.float32,
                         config.attention_impl)
    return model.train()


@torch.no_grad()
def _evaluate(loss_module: CausalLMLoss, validation, config: TrainConfig, autocast,
              device: torch.device, bos: int | None) -> dict[str, dict[str, float]]:
    """Mean next-token loss of each validation set (the first `eval_batches` batches), all ranks."""
    rank, world = dist.get_rank(), dist.get_world_size()
    loss_module.eval()
    domains = {}
    for name, dataset in validation.items():
        total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, predicted tokens
        batches = eval_batches(dataset, config.eval_batch_size, process_index=rank, process_count=world)
        for i, rows in enumerate(batches):
            if config.eval_batches and i == config.eval_batches:
                break
            if len(rows):
                ids, *documents = train_step.step_rows(rows, device, bos)
                with autocast:
                    mean, _ = loss_module(ids, *documents)
                count = ids.shape[0] * (ids.shape[1] - 1)
                total += torch.stack([mean.double() * count, torch.tensor(count, dtype=torch.float64,
                                                                          device=device)])
        dist.all_reduce(total)
        loss = (total[0] / total[1]).item()
        domains[name] = {"loss": loss, "ppl": perplexity(loss), "tokens": int(total[1].item())}
    loss_module.train()
    return domains
