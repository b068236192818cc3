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
The step itself is `hammer_torch.train_step`; this module gives it, with evaluation and checkpoints
(`hammer_torch.train_checkpoint`), to the loop both trainers share (`hammer.train_loop`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from convert.hf import torch_step_dirs
from hammer.config import ConfigError, ModelConfig
from hammer.data.loader import (Loader, LoaderState, document_bos, eval_batches, mixture_from_specs,
                                validation_sets)
from hammer.metrics import TrainMeter, peak_flops
from hammer.run import CHECKPOINTS_DIR, check_init, check_inputs, data_fingerprint, open_run, previous_config
from hammer.train_config import TrainConfig
from hammer.train_loop import train_loop
from hammer_torch import train_checkpoint, train_step
from hammer_torch.checkpoint import from_tensors
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
        if config.grad_accum == "auto" and device.type != "cuda":
            raise ConfigError("grad_accum = 'auto' on the torch backend measures a trial step on a "
                              "CUDA device; on the CPU set grad_accum to a number")
        if config.grad_accum != "auto" and config.batch_size % (world * config.grad_accum):
            raise ConfigError(f"batch_size {config.batch_size} is not divisible by {world} processes x "
                              f"grad_accum {config.grad_accum}: every micro-batch must hold the same rows")
        if validation and config.eval_batch_size % world:
            raise ConfigError(f"eval_batch_size {config.eval_batch_size} is not divisible by {world} processes")
        model = _initial_model(config, model_config)
        step_fn = train_step.build(config, model, device)
        if config.grad_accum == "auto":  # resolved before run.json is written: it records the choice
            step_fn.grad_accum = train_step.fit_grad_accum(step_fn, config, mixture.block_size, device)
            config = config.replace(grad_accum=step_fn.grad_accum)
        run_dir = Path(config.output)
        previous = previous_config(run_dir)
        steps = torch_step_dirs(run_dir / CHECKPOINTS_DIR)
        trained = int(steps[-1].name.removeprefix("step_")) if steps else 0
        if rank == 0:
            open_run(config, model_config, data_fingerprint(mixture), trained_steps=trained)
        dist.barrier()
        return _train(config, model_config, model, step_fn, mixture, validation, tokenizer, run_dir,
                      device, previous, bos)


def _train(config: TrainConfig, model_config: ModelConfig, model: Llama, step_fn: train_step.TrainStep,
           mixture, validation, tokenizer, run_dir: Path, device: torch.device,
           previous: TrainConfig | None, bos: int | None) -> Path:
    rank, world = dist.get_rank(), dist.get_world_size()
    checkpoints = run_dir / CHECKPOINTS_DIR
    checkpointer = train_checkpoint.Checkpointer(checkpoints, model_config, model, step_fn.optimizer,
                                                 keep=config.keep_checkpoints, tokenizer=tokenizer)
    resumed = checkpointer.restore()
    if resumed and step_fn.spikes is not None:
        step_fn.spikes.load(resumed.spikes)
    start = resumed.step if resumed else 0
    loader = Loader(mixture, config.batch_size, seed=config.seed, step=start,
                    process_index=rank, process_count=world)
    if resumed:
        loader.restore(LoaderState.from_dict(resumed.loader))
    meter = TrainMeter(config.batch_size * mixture.block_size,
                       model_config.flops_per_token(mixture.block_size), world,
                       peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                                  config.peak_flops))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = TorchTrainer(config, step_fn, device, checkpointer, bos)
    with checkpointer:  # the last save finishes writing before train returns
        train_loop(config, trainer, loader, start=start, run_dir=run_dir, meter=meter,
                   validation=validation, previous=previous, tokenizer=tokenizer)
    return run_dir


class TorchTrainer:
    """The torch pieces of `hammer.train_loop`: the DDP + ZeRO-1 step, evaluation over all ranks,
    checkpoints."""

    compile_time = None  # torch.compile compiles in the first steps, inside their time

    def __init__(self, config: TrainConfig, step_fn: train_step.TrainStep, device: torch.device,
                 checkpointer: train_checkpoint.Checkpointer, bos: int | None):
        self.config, self.step_fn, self.device, self.bos = config, step_fn, device, bos
        self.checkpointer = checkpointer
        self.primary, self.processes = dist.get_rank() == 0, dist.get_world_size()
        self.profiler = None

    def step(self, rows: np.ndarray, lr: float):
        batch = train_step.step_rows(rows, self.device, self.bos)
        if self.profiler is None:
            return self.step_fn(batch, lr)
        with torch.profiler.record_function("hammer.train_step"):
            return self.step_fn(batch, lr)

    def read(self, outputs: list) -> list[dict[str, float]]:
        # this rank's means (cross-entropy, z-loss) are averaged over the ranks; the rest agree
        means = ["loss"] + [k for k in ("z_loss",) if k in outputs[0][2]]
        alike = ["grad_norm"] + [k for k in ("skipped",) if k in outputs[0][2]]
        reduced = torch.stack([torch.stack([loss, *(extra[k] for k in means[1:])])
                               for loss, _, extra in outputs])
        dist.all_reduce(reduced)
        local = torch.stack([torch.stack([norm.double(), *(extra[k].double() for k in alike[1:])])
                             for _, norm, extra in outputs])
        table = torch.cat([reduced / self.processes, local], dim=1).tolist()
        return [dict(zip(means + alike, row)) for row in table]

    def eval_batches(self, dataset):
        for rows in eval_batches(dataset, self.config.eval_batch_size, drop_remainder=True,
                                 process_index=dist.get_rank(), process_count=self.processes):
            yield train_step.step_rows(rows, self.device, self.bos)

    @torch.no_grad()
    def eval_nll(self, batches) -> tuple[float, int]:
        loss_module = self.step_fn.loss_module
        loss_module.eval()
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for ids, *documents in batches:  # full batches, an equal share on every rank
            with self.step_fn.autocast:
                mean, _ = loss_module(ids, *documents)
            total += mean.double() * (ids.shape[0] * (ids.shape[1] - 1))
            count += 1
        loss_module.train()
        dist.all_reduce(total)
        return total.item(), count

    def save(self, step: int, loader_state: dict) -> None:
        spikes = self.step_fn.spikes
        self.checkpointer.save(train_checkpoint.TrainerState(
            step, loader_state, spikes.to_dict() if spikes is not None else None))

    def agree(self, flag: bool) -> bool:
        if self.processes == 1:
            return flag
        shared = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(shared)
        return shared.item() > 0

    def peak_memory_gb(self) -> float | None:
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    @contextlib.contextmanager
    def task_models(self):
        from hammer_torch.generate import TorchStepper
        from hammer_torch.scorer import TorchScorer

        model = self.step_fn.model  # the twin itself: no DDP collective, every rank scores alike
        try:
            yield TorchScorer.from_twin(model), lambda n: TorchStepper(model, n)
        finally:
            model.train()  # the stepper leaves it in eval mode

    def start_profile(self, directory: Path) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.start()
        self.profile_dir = directory

    def stop_profile(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.profiler.stop()
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.profile_dir / "trace.json"))
        self.profiler = None


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
