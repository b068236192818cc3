"""The training run config both trainers read: a TOML file, then `key=value` overrides.

    hammer train --config configs/hammerllm-1.4b.toml steps=1000 mesh.fsdp=8 validation.zh=valid/zh

A value is read as TOML (`lr=3e-4`, `scan_layers=true`, `data=["a", "b:2"]`) and, when it is not
TOML, as a bare string (`output=runs/x`). Dotted keys reach nested tables (`mesh.tensor=2`). Paths
are taken as given, relative to the working directory, whether they come from the file or the
command line. Architecture lives in the model's HF config.json (`model`), not here.

Every key is checked where it enters: an unknown key names the closest valid one, a wrong type or an
impossible value names the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import tomllib
import types
import collections.abc
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from hammer.config import ConfigError, ModelConfig
from hammer.schedule import DECAY_SHAPES, SCHEDULES

BACKENDS = ("jax", "torch")
DTYPES = ("bfloat16", "float32")
REMAT_POLICIES = ("none", "dots", "full")
COMPILE_MODES = ("auto", "blocks", "model", "none")
DISTRIBUTED_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one axis may be -1: every device the others leave."""

    data: int = 1  # pure data parallel: weights replicated
    fsdp: int = -1  # data parallel with weights and optimizer state sharded (ZeRO-3)
    tensor: int = 1  # heads, MLP and vocabulary split across devices (Megatron)

    def __post_init__(self):
        sizes = dataclasses.asdict(self)
        for axis, size in sizes.items():
            if size != -1 and size < 1:
                raise ConfigError(f"mesh.{axis} must be a positive integer or -1 (the rest), got {size}")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError(f"at most one mesh axis may be -1, got {sizes}")

    def resolve(self, device_count: int) -> dict[str, int]:
        """Axis sizes over exactly `device_count` devices; a mesh that leaves devices idle or needs
        more than there are is refused."""
        sizes = dataclasses.asdict(self)
        fixed = math.prod(s for s in sizes.values() if s != -1)
        if -1 in sizes.values():
            if device_count % fixed:
                raise ConfigError(f"mesh {sizes}: the fixed axes ({fixed} devices) do not divide the "
                                  f"{device_count} devices; -1 would leave some idle")
            sizes = {axis: device_count // fixed if s == -1 else s for axis, s in sizes.items()}
        elif fixed != device_count:
            raise ConfigError(f"mesh {sizes} spans {fixed} devices, but there are {device_count}; "
                              f"every device must be used (set one axis to -1 to take the rest)")
        return sizes


@dataclass(frozen=True)
class DistributedConfig:
    """How the processes of a multi-host JAX run find each other (`jax.distributed.initialize`).

    Not part of what a run computes: a resumed run may move to another number of hosts."""

    # auto: join when coordinator_address is set or the environment is a multi-process cluster JAX
    # detects itself (Cloud TPU VM, SLURM step with more than one task, Open MPI); on: always join,
    # JAX detecting the rest; off: one process
    mode: str = "auto"
    coordinator_address: str = ""  # HOST:PORT of process 0 ("": from the cluster environment)
    num_processes: int = 0  # 0: from the cluster environment
    process_id: int = -1  # -1: from the cluster environment
    local_device_ids: tuple[int, ...] = ()  # (): JAX's choice (all, but one GPU a process under SLURM/MPI)
    initialization_timeout: int = 300  # seconds to wait for every process to join
    heartbeat_timeout: int = 100  # seconds of silence after which a process is dead and the run fails

    def __post_init__(self):
        if self.mode not in DISTRIBUTED_MODES:
            raise ConfigError(f"distributed.mode = {self.mode!r}; expected one of {', '.join(DISTRIBUTED_MODES)}")
        for key in ("initialization_timeout", "heartbeat_timeout"):
            if getattr(self, key) < 1:
                raise ConfigError(f"distributed.{key} = {getattr(self, key)} is impossible; expected >= 1 second")
        if self.num_processes < 0:
            raise ConfigError(f"distributed.num_processes = {self.num_processes} is impossible; "
                              f"expected >= 1 (0: from the cluster environment)")
        if self.process_id != -1 and not 0 <= self.process_id < (self.num_processes or self.process_id + 1):
            raise ConfigError(f"distributed.process_id = {self.process_id} is not in [0, num_processes = "
                              f"{self.num_processes}) (-1: from the cluster environment)")
        if any(i < 0 for i in self.local_device_ids):
            raise ConfigError(f"distributed.local_device_ids = {list(self.local_device_ids)}; expected "
                              f"device numbers >= 0")


@dataclass(frozen=True)
class TrainConfig:
    # What to train, on what, where.
    model: str  # an HF config.json, or a directory holding one
    data: tuple[str, ...]  # prepared directories, each "DIR" or "DIR:WEIGHT"
    output: str  # the run directory; rerunning on it resumes
    steps: int  # optimizer steps to train (raising it trains longer; the schedule's horizon is apart)
    batch_size: int  # sequences per optimizer step, all devices together
    init: str = ""  # HF directory or hammer checkpoint whose weights start the run ("" = random)
    tokenizer: str = ""  # tokenizer directory saved with exported checkpoints ("" = none)
    validation: Mapping[str, str] = field(default_factory=dict)  # name -> prepared directory
    backend: str = "jax"
    # HammerLLM's recipe (HF Trainer's AdamW defaults, the clamped cosine, seed 3407).
    grad_accum: int | str = 1  # micro-batches per optimizer step; "auto": the fewest that fit
    memory_limit_gb: float = 0.0  # what grad_accum = "auto" fits a step into (0: the device's)
    lr: float = 5e-4
    warmup_steps: int = 2000
    min_lr_ratio: float = 0.1
    # The learning-rate schedule's horizon (0: `steps`). A resume that changes `steps` must say
    # whether the schedule keeps its horizon (the old steps: the lr stays at its floor after it)
    # or stretches to the new one; hammer.run refuses a silent change.
    schedule_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    seed: int = 3407
    # [first, last] step ranges (1-based, inclusive) of the data order whose batches are never
    # trained on: a diverged run resumes past the batches that made it diverge.
    skip_data: tuple[tuple[int, ...], ...] = ()
    # Beyond HammerLLM's recipe, each off by default.
    schedule: str = "cosine_clamped"  # or "wsd": warmup, stable, decay (hammer.schedule)
    decay_steps: int = 0  # wsd: the final steps over which the lr decays to min_lr_ratio
    decay_shape: str = "linear"  # wsd: linear, cosine or 1-sqrt
    z_loss: float = 0.0  # weight of PaLM's z-loss, mean(logsumexp(logits)^2), in the objective
    document_mask: bool = False  # attention and RoPE positions restart at each [BOS] of a block
    spike_skip: bool = False  # a step whose loss spikes leaves params and optimizer state unchanged
    spike_sigmas: float = 6.0  # spike: loss above mean + spike_sigmas * std of the window
    spike_window: int = 128  # the losses of the last applied steps that mean and std are of
    dtype: str = "bfloat16"  # compute dtype; master weights and optimizer state stay float32
    mesh: MeshConfig = field(default_factory=MeshConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # Checkpoints, logs and evaluation.
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 1000  # 0: never
    eval_batch_size: int = 8  # sequences per evaluation batch, all devices together
    eval_batches: int = 0  # batches per validation set and evaluation (0: the whole set)
    # lm-eval tasks run on the live weights at every evaluation (needs `tokenizer` and the lmeval
    # extra): their names, documents per task (0: all), a directory of local task YAMLs
    eval_tasks: tuple[str, ...] = ()
    eval_tasks_limit: int = 0
    eval_tasks_path: str = ""
    tensorboard: bool = True
    # [first, last] steps traced by the backend's profiler into RUN_DIR/profile/ (process 0; JAX:
    # an XProf trace with a Perfetto copy, torch: a Chrome trace); () = none
    profile_steps: tuple[int, ...] = ()
    # How a step is computed: the same loss, different speed and memory.
    attention_impl: str = "auto"  # jax: auto/xla/cudnn/reference; torch: auto/flash_attn/sdpa/eager
    scan_layers: bool = False  # jax: one compiled layer scanned over the stack
    remat: str = "none"  # activation checkpointing per layer: none, dots (jax: keep matmuls), full
    loss_chunk: int = 1024  # positions whose logits exist at once in the cross-entropy
    compile: str = "auto"  # torch: auto (blocks on CUDA, none on CPU), blocks, model, none
    peak_flops: float = 0.0  # dense bf16 FLOP/s of one device for MFU (0: from the device table)
    # jax: XLA's persistent compilation cache, so a resume or a run that differs only in lr or
    # steps reuses the compiled step. auto: JAX's own setting when one is made
    # (JAX_COMPILATION_CACHE_DIR), else $XDG_CACHE_HOME/hammer/xla; "off": none; else a directory.
    compilation_cache: str = "auto"

    def __post_init__(self):
        _check_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                      if f.name not in TABLES}, TrainConfig, "")
        for key, cls in TABLES.items():
            if not isinstance(getattr(self, key), cls):
                raise ConfigError(f"{key} = {getattr(self, key)!r}; expected a {cls.__name__}")
        checks = [  # (key, holds, what is expected)
            ("steps", self.steps >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum == "auto" or isinstance(self.grad_accum, int)
             and self.grad_accum >= 1, ">= 1 or 'auto'"),
            ("memory_limit_gb", self.memory_limit_gb >= 0, ">= 0 (0: the device's)"),
            ("lr", self.lr > 0, "> 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("schedule_steps", self.schedule_steps >= 0, ">= 0 (0: steps)"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("adam_beta1", 0 <= self.adam_beta1 < 1, "in [0, 1)"),
            ("adam_beta2", 0 <= self.adam_beta2 < 1, "in [0, 1)"),
            ("adam_eps", self.adam_eps > 0, "> 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0: no clipping)"),
            ("seed", self.seed >= 0, ">= 0"),
            ("checkpoint_every", self.checkpoint_every >= 1, ">= 1"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"),
            ("eval_every", self.eval_every >= 0, ">= 0 (0: never)"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("eval_batches", self.eval_batches >= 0, ">= 0 (0: the whole set)"),
            ("eval_tasks_limit", self.eval_tasks_limit >= 0, ">= 0 (0: every document)"),
            ("loss_chunk", self.loss_chunk >= 1, ">= 1"),
            ("peak_flops", self.peak_flops >= 0, ">= 0 (0: from the device table)"),
            ("decay_steps", self.decay_steps >= 0, ">= 0"),
            ("z_loss", self.z_loss >= 0, ">= 0 (0: off)"),
            ("spike_sigmas", self.spike_sigmas > 0, "> 0"),
            ("spike_window", self.spike_window >= 2, ">= 2 (a standard deviation needs two losses)"),
        ]
        for key, holds, expected in checks:
            if not holds:
                raise ConfigError(f"{key} = {getattr(self, key)!r} is impossible; expected {expected}")
        choices = {"backend": BACKENDS, "dtype": DTYPES, "remat": REMAT_POLICIES, "compile": COMPILE_MODES,
                   "schedule": SCHEDULES, "decay_shape": DECAY_SHAPES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} = {getattr(self, key)!r}; expected one of {', '.join(allowed)}")
        if self.schedule == "wsd" and not 1 <= self.decay_steps <= self.horizon - self.warmup_steps:
            raise ConfigError(f"decay_steps = {self.decay_steps} is impossible for schedule = 'wsd'; "
                              f"expected 1 to the horizon (schedule_steps or steps) - warmup_steps = "
                              f"{self.horizon - self.warmup_steps}")
        if self.grad_accum != "auto" and self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by grad_accum "
                              f"{self.grad_accum}: every micro-batch must hold the same sequences")
        if not self.data:
            raise ConfigError("data is empty; expected at least one prepared directory")
        for key in ("model", "output"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is empty; expected a path")
        _check_ranges(self.skip_data)
        if self.profile_steps and (len(self.profile_steps) != 2
                                   or not 1 <= self.profile_steps[0] <= self.profile_steps[1]):
            raise ConfigError(f"profile_steps = {list(self.profile_steps)}; expected [first, last] "
                              f"with 1 <= first <= last")

    @property
    def horizon(self) -> int:
        """The step count the learning-rate schedule spans."""
        return self.schedule_steps or self.steps

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch, all devices together (grad_accum resolved)."""
        if self.grad_accum == "auto":
            raise ValueError("grad_accum = 'auto' is resolved by the trainer before it is used")
        return self.batch_size // self.grad_accum

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.model)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data"], d["validation"] = list(self.data), dict(self.validation)
        d["skip_data"] = [list(r) for r in self.skip_data]
        return d

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


TABLES = {"mesh": MeshConfig, "distributed": DistributedConfig}  # nested tables of TrainConfig


def load_train_config(path: str | os.PathLike | None = None,
                      overrides: Sequence[str] = ()) -> TrainConfig:
    """The config of TOML file `path` (optional) with `key=value` overrides applied in order."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"training config {path} not found")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(values, key, value)
    return from_dict(values)


def from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from nested plain values (a parsed TOML file or `TrainConfig.to_dict()`)."""
    values = dict(values)
    _check_keys(values, TrainConfig, "")
    tables = {}
    for key, cls in TABLES.items():
        table = values.pop(key, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{key} = {table!r}; expected a table with "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        _check_keys(table, cls, f"{key}.")
        _check_types(table, cls, f"{key}.")
        tables[key] = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in table.items()})
    required = [f.name for f in dataclasses.fields(TrainConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)} (set them in the TOML file or as key=value)")
    if isinstance(values.get("data"), str):  # one directory: the common case, written plainly
        values["data"] = [values["data"]]
    _check_types(values, TrainConfig, "")
    values["data"] = tuple(values["data"])
    if "skip_data" in values:
        values["skip_data"] = tuple(tuple(r) for r in values["skip_data"])
    values["validation"] = dict(values.get("validation", {}))
    for key in ("lr", "min_lr_ratio", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                "max_grad_norm", "peak_flops", "memory_limit_gb", "z_loss", "spike_sigmas"):
        if key in values:
            values[key] = float(values[key])
    return TrainConfig(**values, **tables)


def _check_ranges(ranges: tuple[tuple[int, ...], ...]) -> None:
    previous = 0
    for r in ranges:
        if len(r) != 2 or not 1 <= r[0] <= r[1]:
            raise ConfigError(f"skip_data range {list(r)} is not [first, last] with 1 <= first <= last")
        if r[0] <= previous:
            raise ConfigError(f"skip_data ranges {[list(x) for x in ranges]} overlap or are out of "
                              f"order; expected ascending, disjoint [first, last] pairs")
        previous = r[1]


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare string: a path, a name
    return key, value


def _set_dotted(values: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = values
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {'.'.join(parents[:i + 1])} is not a table")
    node[last] = value


def _check_keys(values: Mapping[str, Any], cls: type, prefix: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")


def _check_types(values: Mapping[str, Any], cls: type, prefix: str) -> None:
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key in TABLES and cls is TrainConfig:
            continue
        expected = hints[key]
        if not _is_instance(value, expected):
            raise ConfigError(f"{prefix}{key} = {value!r} has the wrong type; expected {_describe(expected)}")


def _is_instance(value: Any, expected: Any) -> bool:
    origin = typing.get_origin(expected)
    if origin is types.UnionType:
        return any(_is_instance(value, option) for option in typing.get_args(expected))
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if origin is tuple:  # tuple[str, ...], tuple[int, ...] or of those, written as a TOML array
        item = typing.get_args(expected)[0]
        return isinstance(value, (list, tuple)) and all(_is_instance(v, item) for v in value)
    if origin in (collections.abc.Mapping, dict):
        return isinstance(value, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    if dataclasses.is_dataclass(expected):
        return isinstance(value, Mapping)
    raise TypeError(f"no type check for {expected}")


def _describe(expected: Any) -> str:
    if typing.get_origin(expected) is types.UnionType:
        return " or ".join(_describe(option) for option in typing.get_args(expected))
    if typing.get_origin(expected) is tuple:
        return {str: "a list of strings", int: "a list of integers"}.get(
            typing.get_args(expected)[0], "a list of [first, last] pairs of integers")
    if typing.get_origin(expected) in (collections.abc.Mapping, dict):
        return "a table of name = string"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        expected, str(expected))
