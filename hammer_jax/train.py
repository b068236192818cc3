"""`hammer train` on the JAX backend: HammerLLM's recipe on a device mesh, resumable at any time.

    config -> processes -> mesh -> data -> run directory -> model and optimizer state (fresh or
    resumed) -> hammer.train_loop with this backend's step, evaluation and checkpoints

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
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import convert
from hammer.config import ConfigError, ModelConfig
from hammer.data.loader import (Loader, LoaderState, document_bos, eval_batches, mixture_from_specs,
                                validation_sets)
from hammer.metrics import TrainMeter, peak_flops
from hammer.run import check_init, check_inputs, data_fingerprint, open_run, previous_config
from hammer.train_config import TrainConfig
from hammer.train_loop import train_loop
from hammer_jax.checkpoint import model_from_params
from hammer_jax.distributed import BatchPlacer, any_process, join, sync
from hammer_jax.fit_batch import abstract_batch, device_limit, fit_grad_accum
from hammer_jax.model import ATTENTION_IMPLS, Llama
from hammer_jax.optimizer import make_optimizer
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
    use_compilation_cache(config.compilation_cache)
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
    run_dir = Path(config.output)
    previous = previous_config(run_dir)
    trained = max(TrainCheckpoints.steps(run_dir), default=0)
    # every process refuses a run it cannot resume (the same one-line error everywhere), then
    # process 0 alone writes
    open_run(config, model_config, fingerprint, write=False, trained_steps=trained)
    sync("hammer: run directory checked")
    # A run's padded vocabulary is fixed when it starts (128 x the tensor axis, so each shard
    # holds whole 128-row tiles); a resume, on whatever mesh, keeps the rows its checkpoints hold
    # (as a multiple, that row count pads to itself) so the restore targets their shapes.
    model_options["vocab_multiple"] = (convert.run_vocab_rows(run_dir)
                                       or convert.VOCAB_MULTIPLE * mesh.shape["tensor"])

    def make_model():
        return Llama(model_config, rngs=nnx.Rngs(config.seed), **model_options)

    tx = make_optimizer(config)
    graphdef, shardings, abstract = state_layout(make_model, tx, mesh)
    to_device = BatchPlacer(mesh, config.batch_size, mixture.block_size)
    compiled = None
    if config.grad_accum == "auto":  # resolved before run.json is written: it records the choice
        accum, compiled = fit_grad_accum(
            lambda accum: _compile_step(config.replace(grad_accum=accum), graphdef, tx, shardings,
                                        mesh, abstract, abstract_batch(to_device.sharding,
                                                                       *to_device.shape, bos)),
            config.batch_size, batch_shards(mesh), device_limit(config.memory_limit_gb))
        config = config.replace(grad_accum=accum)
    if primary:
        open_run(config, model_config, fingerprint, trained_steps=trained)
        _write_model_files(run_dir, model_config, tokenizer)
    sync("hammer: run directory open")

    checkpoints = TrainCheckpoints(run_dir, config.keep_checkpoints)
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

    trainer = JaxTrainer(config, mesh, graphdef, tx, shardings, state, checkpoints, to_device,
                         {"seed": config.seed, "data": fingerprint}, bos)
    trainer.compile(loader.batch(loader.step), compiled)
    meter = TrainMeter(config.batch_size * mixture.block_size,
                       model_config.flops_per_token(mixture.block_size), jax.device_count(),
                       peak_flops(jax.local_devices()[0].device_kind, config.peak_flops))
    with contextlib.ExitStack() as closing:
        closing.callback(checkpoints.close)
        closing.callback(checkpoints.wait)  # a save already started is of a good step: let it finish
        train_loop(config, trainer, loader, start=start, run_dir=run_dir, meter=meter,
                   validation=validation, previous=previous, tokenizer=tokenizer)
    return run_dir


class JaxTrainer:
    """The JAX pieces of `hammer.train_loop`: the sharded state, its jitted step and evaluation,
    orbax checkpoints."""

    def __init__(self, config: TrainConfig, mesh, graphdef, tx, shardings, state, checkpoints,
                 to_device: BatchPlacer, meta: dict, bos: int | None):
        self.config, self.mesh, self.state, self.bos = config, mesh, state, bos
        self.checkpoints, self.to_device, self.meta = checkpoints, to_device, meta
        self.primary, self.processes = jax.process_index() == 0, jax.process_count()
        self.graphdef = graphdef
        self.step_fn = make_train_step(graphdef, tx, shardings, mesh, grad_accum=config.grad_accum,
                                       loss_chunk=config.loss_chunk, z_loss=config.z_loss)
        self.eval_fn = make_eval_step(graphdef, shardings.params, mesh, loss_chunk=config.loss_chunk)
        self.compile_time = None

    def compile(self, rows: np.ndarray, compiled=None) -> None:
        """Compiles the step for the state and batches it will run on (`compiled`: already done)."""
        began = time.perf_counter()
        self.step_fn = compiled or self.step_fn.lower(self.state, self.batch(rows),
                                                      jnp.float32(0)).compile()
        self.compile_time = time.perf_counter() - began

    def step(self, rows: np.ndarray, lr: float):
        self.state, out = self.step_fn(self.state, self.batch(rows), jnp.float32(lr))
        return out

    def read(self, outputs: list) -> list[dict[str, float]]:
        return [{k: float(v) for k, v in out.items()} for out in jax.device_get(outputs)]

    def batch(self, rows: np.ndarray):
        """The step's global batch from this process's rows (with their documents, when masked)."""
        return place_batch(rows, self.to_device, self.bos)

    def eval_batches(self, dataset):
        place = BatchPlacer(self.mesh, self.config.eval_batch_size, dataset.block_size)
        for rows in eval_batches(dataset, self.config.eval_batch_size, rows=place.rows,
                                 drop_remainder=True):
            yield place_batch(rows, place, self.bos)

    def eval_nll(self, batches) -> tuple[float, int]:
        total, count = jnp.zeros((), jnp.float32), 0
        for batch in batches:
            total, count = total + self.eval_fn(self.state.params, batch), count + 1
        return float(total), count

    def save(self, step: int, loader_state: dict) -> None:
        self.checkpoints.save(self.state, {"step": step, "loader": loader_state, **self.meta})

    def agree(self, flag: bool) -> bool:
        return any_process(flag)

    def peak_memory_gb(self) -> float | None:
        stats = jax.local_devices()[0].memory_stats() or {}
        return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None

    @contextlib.contextmanager
    def task_models(self):
        from hammer_jax.generate import JaxStepper
        from hammer_jax.scorer import JaxScorer

        live = nnx.merge(self.graphdef, self.state.params)  # the sharded params, not a copy
        yield JaxScorer(live), lambda n: JaxStepper(live, n)

    def start_profile(self, directory: Path) -> None:
        # JAX's start_trace and stop_trace crash the process (SIGSEGV in a native thread) while
        # orbax's save thread runs beside them, as a CI run did when profiled step 5 began during
        # step 4's save; waiting for the save first crashed none (bench/profile_during_save.py;
        # cf. jax#40260). The trace is of training steps, not of a checkpoint.
        self.checkpoints.wait()  # joins this process's save thread; not a collective
        jax.profiler.start_trace(str(directory), create_perfetto_trace=True)

    def stop_profile(self) -> None:
        jax.block_until_ready(self.state)  # the traced steps' device work, not only their dispatch
        self.checkpoints.wait()
        jax.profiler.stop_trace()


def use_compilation_cache(setting: str) -> None:
    """Points XLA's persistent compilation cache where `compilation_cache` says (TrainConfig)."""
    if setting == "off":
        return
    if setting == "auto":
        if jax.config.jax_compilation_cache_dir:  # the user's own JAX setting wins
            return
        setting = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hammer" / "xla")
    jax.config.update("jax_compilation_cache_dir", setting)


def model_options_of(config: TrainConfig) -> dict:
    """The `Llama` options of a run's config (the vocabulary padding aside, set by the mesh)."""
    impl = None if config.attention_impl == "auto" else config.attention_impl
    if impl is not None and impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl = {impl!r} is not a JAX kernel; expected auto or one "
                          f"of {', '.join(ATTENTION_IMPLS)}")
    return dict(dtype=DTYPES[config.dtype], param_dtype=jnp.float32, attention_impl=impl,
                scan_layers=config.scan_layers, remat=config.remat)


def _compile_step(config: TrainConfig, graphdef, tx, shardings, mesh, abstract, batch):
    step = make_train_step(graphdef, tx, shardings, mesh, grad_accum=config.grad_accum,
                           loss_chunk=config.loss_chunk, z_loss=config.z_loss)
    return step.lower(abstract, batch, jax.ShapeDtypeStruct((), jnp.float32)).compile()


def _check_batch_layout(config: TrainConfig, shards: int) -> None:
    if config.grad_accum == "auto":
        return  # fit_grad_accum tries only the splits the mesh can take
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
