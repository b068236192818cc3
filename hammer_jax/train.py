"""`hammer train` on the JAX backend: HammerLLM's recipe on a device mesh, resumable at any time.

    config -> processes -> mesh -> data -> run directory -> model and optimizer state (fresh or
    resumed) -> loop: step, log, evaluate, checkpoint; SIGTERM saves and exits 0; a non-finite loss
    stops the run

Everything a user can get wrong (model config, mesh, batch layout, data, validation sets, init
weights, tokenizer) is checked before the run directory is made, so a bad config leaves nothing
behind. The run directory also gets the model's config.json (and the tokenizer, when set), so a
checkpoint in it is a model `hammer convert`, `eval` and `generate` read.

On many hosts every process runs this same function (hammer_jax.distributed joins them first): each
reads only its rows of every batch, all take part in every step and checkpoint, and process 0 alone
writes the run directory's files, metrics and progress bar. The run directory must be on a
filesystem every host sees.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import convert
from hammer.config import ConfigError, ModelConfig
from hammer.data.loader import Loader, LoaderState, eval_batches, mixture_from_specs, validation_sets
from hammer.metrics import MetricsLog, check_finite, mfu, peak_flops
from hammer.run import data_fingerprint, open_run
from hammer.train_config import TrainConfig
from hammer_jax.checkpoint import model_from_params
from hammer_jax.distributed import BatchPlacer, any_process, join, sync
from hammer_jax.model import ATTENTION_IMPLS, Llama
from hammer_jax.optimizer import learning_rate_schedule, make_optimizer
from hammer_jax.sharding import make_mesh, model_shardings
from hammer_jax.train_checkpoint import TrainCheckpoints, abstract_state
from hammer_jax.train_step import (TrainState, batch_shards, init_state,
                                   make_eval_step, make_train_step, state_shardings)

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def train(config: TrainConfig) -> Path:
    """Runs (or resumes) the run `config` describes; returns its directory."""
    join(config.distributed)  # before anything else asks JAX about devices
    primary = jax.process_index() == 0
    model_config = config.model_config()
    model_options = _model_options(config)
    mesh = make_mesh(config.mesh)
    _check_batch_layout(config, batch_shards(mesh))
    mixture = mixture_from_specs(config.data)
    _check_data(model_config, mixture.datasets, "data")
    validation = validation_sets(dict(config.validation)) if config.validation else {}
    _check_validation(config, mixture, validation, batch_shards(mesh))
    tokenizer = _tokenizer(config, mixture)
    if config.init:
        _check_init(config.init, model_config)
    # every process refuses a run it cannot resume (the same one-line error everywhere), then
    # process 0 alone writes
    run_dir = open_run(config, model_config, data_fingerprint(mixture), write=False)
    sync("hammer: run directory checked")
    if primary:
        open_run(config, model_config, data_fingerprint(mixture))
        _write_model_files(run_dir, model_config, tokenizer)
    sync("hammer: run directory open")
    # A run's padded vocabulary is fixed when it starts (128 x the tensor axis, so each shard
    # holds whole 128-row tiles); a resume, on whatever mesh, keeps the rows its checkpoints hold
    # (as a multiple, that row count pads to itself) so the restore targets their shapes.
    model_options["vocab_multiple"] = (convert.run_vocab_rows(run_dir)
                                       or convert.VOCAB_MULTIPLE * mesh.shape["tensor"])

    def make_model():
        return Llama(model_config, rngs=nnx.Rngs(config.seed), **model_options)

    abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract_params = nnx.split(abstract_model)
    param_shardings = nnx.to_pure_dict(model_shardings(abstract_model, mesh))
    tx, schedule = make_optimizer(config), learning_rate_schedule(config)
    shardings = state_shardings(param_shardings, tx, mesh)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                        params=nnx.to_pure_dict(abstract_params),
                        opt_state=jax.eval_shape(tx.init, nnx.to_pure_dict(abstract_params)))

    checkpoints = TrainCheckpoints(run_dir, config.keep_checkpoints)
    to_device = BatchPlacer(mesh, config.batch_size, mixture.block_size)
    loader = Loader(mixture, config.batch_size, seed=config.seed, rows=to_device.rows)
    restored = checkpoints.restore(abstract_state(shardings, shapes))
    if restored is None:
        params = (_init_params(config.init, model_config, model_options, param_shardings)
                  if config.init else
                  jax.jit(lambda: nnx.to_pure_dict(nnx.state(make_model())),
                          out_shardings=param_shardings)())
        state, start = init_state(params, tx, shardings), 0
    else:
        state, meta = restored
        start = meta["step"]
        loader.restore(LoaderState.from_dict(meta["loader"]))
        if primary:
            print(f"resuming {run_dir} from step {start}", file=sys.stderr)

    step_fn = make_train_step(graphdef, tx, schedule, shardings, mesh,
                              grad_accum=config.grad_accum, loss_chunk=config.loss_chunk)
    eval_fn = make_eval_step(graphdef, param_shardings, mesh, loss_chunk=config.loss_chunk)
    compile_start = time.perf_counter()
    step_fn = step_fn.lower(state, to_device(loader.batch(loader.step))).compile()
    compile_time = time.perf_counter() - compile_start

    meter = _Meter(config, model_config, mixture.block_size, compile_time)
    preempted = _SigtermFlag()
    metrics = MetricsLog(run_dir, start, tensorboard=config.tensorboard) if primary else None
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0, disable=not primary)
    try:
        for done in range(start + 1, config.steps + 1):
            batch = to_device(next(loader))
            began = time.perf_counter()
            state, out = step_fn(state, batch)
            out = {k: float(v) for k, v in jax.device_get(out).items()}
            meter.add(out, time.perf_counter() - began)
            check_finite(done, loss=out["loss"], grad_norm=out["grad_norm"])
            bar.update()
            if done % config.log_every == 0 or done == config.steps:
                record = meter.record(done)
                if primary:
                    metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if validation and config.eval_every and done % config.eval_every == 0:
                record = _evaluate(eval_fn, state.params, validation, config, done, mesh)
                if primary:
                    metrics.write(record)
            stop = any_process(preempted.flag)  # a SIGTERM on any host: all save this step and stop
            if done % config.checkpoint_every == 0 or done == config.steps or stop:
                checkpoints.save(state, {"step": done, "loader": loader.state.to_dict(),
                                         "seed": config.seed, "data": data_fingerprint(mixture)})
            if stop:
                if primary:
                    print(f"SIGTERM: saved step {done} in {checkpoints.directory}; rerun the same "
                          f"command to resume", file=sys.stderr)
                break
    finally:
        bar.close()
        preempted.restore()
        checkpoints.wait()  # a save already started is of a good step: let it finish
        checkpoints.close()
        if primary:
            metrics.close()
    return run_dir


def _model_options(config: TrainConfig) -> dict:
    impl = None if config.attention_impl == "auto" else config.attention_impl
    if impl is not None and impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl = {impl!r} is not a JAX kernel; expected auto or one "
                          f"of {', '.join(ATTENTION_IMPLS)}")
    return dict(dtype=DTYPES[config.dtype], param_dtype=jnp.float32, attention_impl=impl,
                scan_layers=config.scan_layers, remat=config.remat)


def _check_batch_layout(config: TrainConfig, shards: int) -> None:
    if config.micro_batch_size % shards:
        raise ConfigError(f"batch_size / grad_accum = {config.micro_batch_size} sequences per "
                          f"micro-batch cannot be split over the mesh's {shards} data-parallel "
                          f"devices (mesh.data x mesh.fsdp); make it a multiple of {shards}")


def _check_data(model: ModelConfig, datasets, key: str) -> None:
    for ds in datasets:
        vocab = ds.metadata["settings"]["tokenizer"]["vocab_size"]
        if vocab > model.vocab_size:
            raise ConfigError(f"{key}: {ds.path} holds ids of a {vocab}-token vocabulary; the "
                              f"model's vocab_size is {model.vocab_size}")
        if ds.block_size > model.max_position_embeddings:
            raise ConfigError(f"{key}: {ds.path} has blocks of {ds.block_size} tokens, more than "
                              f"the model's max_position_embeddings {model.max_position_embeddings}")


def _check_validation(config: TrainConfig, mixture, validation, shards: int) -> None:
    _check_data(config.model_config(), validation.values(), "validation")
    if validation and config.eval_batch_size % shards:
        raise ConfigError(f"eval_batch_size {config.eval_batch_size} cannot be split over the "
                          f"mesh's {shards} data-parallel devices; make it a multiple of {shards}")
    for name, ds in validation.items():
        if ds.fingerprint != mixture.datasets[0].fingerprint:
            raise ConfigError(f"validation.{name}: {ds.path} was made with another tokenizer "
                              f"({ds.fingerprint}) than the training data ({mixture.datasets[0].fingerprint})")
        if len(ds) < config.eval_batch_size:
            raise ConfigError(f"validation.{name}: {ds.path} has {len(ds)} blocks, fewer than "
                              f"eval_batch_size {config.eval_batch_size}")


def _tokenizer(config: TrainConfig, mixture):
    if not config.tokenizer:
        return None
    from hammer.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(config.tokenizer)
    if tokenizer.fingerprint != mixture.datasets[0].fingerprint:
        raise ConfigError(f"tokenizer {config.tokenizer} is not the one the data was prepared with "
                          f"({tokenizer.fingerprint} vs {mixture.datasets[0].fingerprint})")
    return tokenizer


def _check_init(path: str, model: ModelConfig) -> None:
    if convert.is_jax_dir(path):
        config_dir = convert.locate_jax(path)[0]
    elif convert.is_hf_dir(path):
        config_dir = path
    else:
        raise ConfigError(f"init = {path!r} is not an HF directory, a hammer JAX directory or a "
                          f"JAX training checkpoint (run directory or step)")
    theirs = ModelConfig.from_hf(config_dir)
    if theirs != model:
        raise ConfigError(f"init = {path!r} is another architecture than model = {model!r}: "
                          f"{theirs} vs {model}")


def _init_params(path: str, model: ModelConfig, options: dict, shardings):
    _, params = convert.read_jax_params(path, options["scan_layers"])
    loaded = model_from_params(model, params, dtype=options["dtype"], param_dtype=jnp.float32,
                               vocab_multiple=options["vocab_multiple"])
    return jax.device_put(nnx.to_pure_dict(nnx.state(loaded)), shardings)


def _write_model_files(run_dir: Path, model: ModelConfig, tokenizer) -> None:
    """config.json (float32, as the checkpoints' master weights) and the tokenizer files."""
    if not (run_dir / "config.json").is_file():
        model.save(run_dir, dtype="float32")
    if tokenizer is not None and not (run_dir / "tokenizer.model").is_file():  # a rerun keeps them
        tokenizer.save_pretrained(run_dir)


def _evaluate(eval_fn, params, validation, config: TrainConfig, step: int, mesh) -> dict:
    """Per-domain loss and perplexity over the first `eval_batches` full batches of each set."""
    domains = {}
    for name, ds in validation.items():
        place = BatchPlacer(mesh, config.eval_batch_size, ds.block_size)
        total, tokens = 0.0, 0
        batches = eval_batches(ds, config.eval_batch_size, rows=place.rows, drop_remainder=True)
        for i, rows in enumerate(batches):
            if config.eval_batches and i == config.eval_batches:
                break
            total += float(eval_fn(params, place(rows)))
            tokens += config.eval_batch_size * (ds.block_size - 1)
        loss = total / tokens
        domains[name] = {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}
    return {"step": step, "kind": "eval", "domains": domains}


class _Meter:
    """The train record of the steps since the previous one: mean loss, speed, MFU, memory."""

    def __init__(self, config: TrainConfig, model: ModelConfig, block_size: int, compile_time: float):
        self.tokens_per_step = config.batch_size * block_size
        self.flops_per_token = model.flops_per_token(block_size)
        self.devices = jax.devices()
        self.local_device = jax.local_devices()[0]
        self.peak = peak_flops(self.local_device.device_kind, config.peak_flops)
        self.compile_time = compile_time
        self.losses, self.seconds, self.last = [], 0.0, {}

    def add(self, out: dict, seconds: float) -> None:
        self.losses.append(out["loss"])
        self.seconds += seconds
        self.last = out

    def record(self, step: int) -> dict:
        steps = len(self.losses)
        tokens_per_s = steps * self.tokens_per_step / self.seconds
        record = {"step": step, "kind": "train", "loss": sum(self.losses) / steps,
                  "lr": self.last["lr"], "grad_norm": self.last["grad_norm"],
                  "tokens": step * self.tokens_per_step, "tokens_per_s": tokens_per_s,
                  "tokens_per_s_per_device": tokens_per_s / len(self.devices),
                  "step_time": self.seconds / steps,
                  "mfu": mfu(self.flops_per_token, tokens_per_s, len(self.devices), self.peak)}
        if self.compile_time is not None:
            record["compile_time"], self.compile_time = self.compile_time, None
        stats = self.local_device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            record["peak_memory_gb"] = stats["peak_bytes_in_use"] / 2**30
        self.losses, self.seconds = [], 0.0
        return record


class _SigtermFlag:
    """Set by SIGTERM (preemption): the loop saves at the end of the step it is in and exits 0."""

    def __init__(self):
        self.flag = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)
