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

import contextlib
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

import convert
from hammer.config import ConfigError, ModelConfig
from hammer.data.loader import (Loader, LoaderState, document_bos, eval_batches, mixture_from_specs,
                                validation_sets)
from hammer.metrics import MetricsLog, TrainMeter, check_finite, peak_flops, perplexity
from hammer.run import check_init, check_inputs, data_fingerprint, open_run, sigterm_flag
from hammer.train_config import TrainConfig
from hammer_jax.checkpoint import model_from_params
from hammer_jax.distributed import BatchPlacer, any_process, join, sync
from hammer_jax.model import ATTENTION_IMPLS, Llama
from hammer_jax.optimizer import learning_rate_schedule, make_optimizer
from hammer_jax.sharding import make_mesh
from hammer_jax.train_checkpoint import TrainCheckpoints
from hammer_jax.train_step import (
    batch_shards,
    init_state,
    make_eval_step,
    make_train_step,
    place_batch,
    random_params,
    state_layout,
)

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


def train(config: TrainConfig) -> Path:
    """Runs (or resumes) the run `config` describes; returns its directory."""
    join(config.distributed)  # before anything else asks JAX about devices
    primary = jax.process_index() == 0
    model_config = config.model_config()
    model_options = model_options_of(config)
    bos = document_bos(config.document_mask, model_config.bos_token_id)
    mesh = make_mesh(config.mesh)
    _check_batch_layout(config, batch_shards(mesh))
    mixture = mixture_from_specs(config.data)
    validation = validation_sets(dict(config.validation)) if config.validation else {}
    if validation and config.eval_batch_size % batch_shards(mesh):
        raise ConfigError(f"eval_batch_size {config.eval_batch_size} cannot be split over the "
                          f"mesh's {batch_shards(mesh)} data-parallel devices; make it a multiple "
                          f"of {batch_shards(mesh)}")
    tokenizer = check_inputs(config, model_config, mixture, validation)
    fingerprint = data_fingerprint(mixture)  # hashes every dataset's index: once a run
    if config.init:
        _check_init_dir(config.init, model_config)
    # every process refuses a run it cannot resume (the same one-line error everywhere), then
    # process 0 alone writes
    run_dir = open_run(config, model_config, fingerprint, write=False)
    sync("hammer: run directory checked")
    if primary:
        open_run(config, model_config, fingerprint)
        _write_model_files(run_dir, model_config, tokenizer)
    sync("hammer: run directory open")
    # A run's padded vocabulary is fixed when it starts (128 x the tensor axis, so each shard
    # holds whole 128-row tiles); a resume, on whatever mesh, keeps the rows its checkpoints hold
    # (as a multiple, that row count pads to itself) so the restore targets their shapes.
    model_options["vocab_multiple"] = (convert.run_vocab_rows(run_dir)
                                       or convert.VOCAB_MULTIPLE * mesh.shape["tensor"])

    def make_model():
        return Llama(model_config, rngs=nnx.Rngs(config.seed), **model_options)

    tx, schedule = make_optimizer(config), learning_rate_schedule(config)
    graphdef, shardings, abstract = state_layout(make_model, tx, mesh)

    checkpoints = TrainCheckpoints(run_dir, config.keep_checkpoints)
    to_device = BatchPlacer(mesh, config.batch_size, mixture.block_size)
    loader = Loader(mixture, config.batch_size, seed=config.seed, rows=to_device.rows)
    restored = checkpoints.restore(abstract)
    if restored is None:
        params = (_init_params(config.init, model_config, model_options, shardings.params)
                  if config.init else random_params(make_model, shardings.params))
        state, start = init_state(params, tx, shardings), 0
    else:
        state, meta = restored
        start = meta["step"]
        loader.restore(LoaderState.from_dict(meta["loader"]))
        if primary:
            print(f"resuming {run_dir} from step {start}", file=sys.stderr)

    step_fn = make_train_step(graphdef, tx, schedule, shardings, mesh,
                              grad_accum=config.grad_accum, loss_chunk=config.loss_chunk,
                              z_loss=config.z_loss)
    eval_fn = make_eval_step(graphdef, shardings.params, mesh, loss_chunk=config.loss_chunk)
    compile_start = time.perf_counter()
    step_fn = step_fn.lower(state, place_batch(loader.batch(loader.step), to_device, bos)).compile()
    compile_time = time.perf_counter() - compile_start

    meter = TrainMeter(config.batch_size * mixture.block_size,
                       model_config.flops_per_token(mixture.block_size), jax.device_count(),
                       peak_flops(jax.local_devices()[0].device_kind, config.peak_flops))
    metrics = MetricsLog(run_dir, start, tensorboard=config.tensorboard) if primary else None
    bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0, disable=not primary)
    with sigterm_flag() as preempted, contextlib.ExitStack() as closing:
        closing.callback(bar.close)
        closing.callback(checkpoints.close)
        closing.callback(checkpoints.wait)  # a save already started is of a good step: let it finish
        if primary:
            closing.enter_context(metrics)
        for done in range(start + 1, config.steps + 1):
            batch = place_batch(next(loader), to_device, bos)
            began = time.perf_counter()
            state, out = step_fn(state, batch)
            out = {k: float(v) for k, v in jax.device_get(out).items()}
            meter.add(out["loss"], time.perf_counter() - began, out["lr"], out["grad_norm"])
            if not config.spike_skip:  # a skipped non-finite step changed nothing
                check_finite(done, loss=out["loss"], grad_norm=out["grad_norm"])
            bar.update()
            if done % config.log_every == 0 or done == config.steps:
                record = meter.record(done)
                if compile_time is not None:  # the first record of this process says it
                    record["compile_time"], compile_time = compile_time, None
                stats = jax.local_devices()[0].memory_stats() or {}
                if "peak_bytes_in_use" in stats:
                    record["peak_memory_gb"] = stats["peak_bytes_in_use"] / 2**30
                if primary:
                    metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if validation and config.eval_every and done % config.eval_every == 0:
                record = _evaluate(eval_fn, state.params, validation, config, done, mesh, bos)
                if primary:
                    metrics.write(record)
            stop = any_process(preempted())  # a SIGTERM on any host: all save this step and stop
            if done % config.checkpoint_every == 0 or done == config.steps or stop:
                checkpoints.save(state, {"step": done, "loader": loader.state.to_dict(),
                                         "seed": config.seed, "data": fingerprint})
            if stop:
                if primary:
                    print(f"SIGTERM: saved step {done} in {checkpoints.directory}; rerun the same "
                          f"command to resume", file=sys.stderr)
                break
    return run_dir


def model_options_of(config: TrainConfig) -> dict:
    """The `Llama` options of a run's config (the vocabulary padding aside, set by the mesh)."""
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


def _check_init_dir(path: str, model: ModelConfig) -> None:
    if convert.is_jax_dir(path):
        config_dir = convert.locate_jax(path)[0]
    elif convert.is_hf_dir(path):
        config_dir = path
    else:
        raise ConfigError(f"init = {path!r} is not an HF directory, a hammer JAX directory or a "
                          f"JAX training checkpoint (run directory or step)")
    check_init(path, ModelConfig.from_hf(config_dir), model)


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


def _evaluate(eval_fn, params, validation, config: TrainConfig, step: int, mesh, bos) -> dict:
    """Per-domain loss and perplexity over the first `eval_batches` full batches of each set."""
    domains = {}
    for name, ds in validation.items():
        place = BatchPlacer(mesh, config.eval_batch_size, ds.block_size)
        total, tokens = 0.0, 0
        batches = eval_batches(ds, config.eval_batch_size, rows=place.rows, drop_remainder=True)
        for i, rows in enumerate(batches):
            if config.eval_batches and i == config.eval_batches:
                break
            total += float(eval_fn(params, place_batch(rows, place, bos)))
            tokens += config.eval_batch_size * (ds.block_size - 1)
        loss = total / tokens
        domains[name] = {"loss": loss, "ppl": perplexity(loss), "tokens": tokens}
    return {"step": step, "kind": "eval", "domains": domains}
