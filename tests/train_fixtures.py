"""Shared pieces of the trainer tests (both backends): a tiny model config, tiny prepared data with a
validation set, a TOML training config, and helpers that run `hammer train` in a subprocess.

    inputs = tiny_inputs(directory)                  # TinyInputs(model, data, validation)
    config = write_train_config(tmp_path / "c.toml", inputs, tmp_path / "run", steps=4)
    result = run_train(config, "steps=6", devices=8)  # CompletedProcess, output captured
    proc = start_train(config, log=tmp_path / "err")   # Popen, for kill/SIGTERM tests
    wait_until(proc, lambda: (tmp_path / "run" / "checkpoints").is_dir(), tmp_path / "err")

The model is small enough to train a step in milliseconds on a CPU (hidden 64, 2 layers, vocab 259 of
the byte tokenizer, blocks of 32 tokens); its dims are all distinct, and the vocabulary is odd (the JAX
model pads it to a multiple of 128 x the tensor axis).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tests.data_helpers import ByteTokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 32
MODEL = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "vocab_size": ByteTokenizer.vocab_size, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "initializer_range": 0.02,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
# Settings that make a run take seconds; tests override what they are about.
TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 6, "batch_size": 8, "grad_accum": 1, "lr": 3e-3, "warmup_steps": 2, "min_lr_ratio": 0.1,
    "seed": 3407, "dtype": "float32", "checkpoint_every": 2, "keep_checkpoints": 3, "log_every": 1,
    "eval_every": 0, "eval_batch_size": 8, "eval_batches": 2, "tensorboard": False,
    "loss_chunk": 64, "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
}

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "one bird", "our model"]
_VERBS = ["sees", "likes", "finds", "reads", "follows", "draws"]
_OBJECTS = ["the ball", "a tree", "the river", "some bread", "a small house", "the moon"]


@dataclass(frozen=True)
class TinyInputs:
    model: Path  # an HF config.json
    data: Path  # a prepared dataset (training)
    validation: Path  # a prepared dataset (held out)


def sentences(count: int, seed: int) -> list[str]:
    """Documents of a tiny grammar: learnable in a few steps, so a falling loss shows."""
    rng = random.Random(seed)
    return [" ".join(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
                     for _ in range(rng.randint(1, 3))) for _ in range(count)]


def write_model_config(path: Path, **changes: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**MODEL, **changes}, indent=2))
    return path


def prepare_tiny_data(directory: Path, documents: int, seed: int) -> Path:
    """A prepared dataset of `documents` grammar documents in blocks of BLOCK_SIZE byte tokens."""
    from hammer.data import prepare

    directory.parent.mkdir(parents=True, exist_ok=True)
    source = write_jsonl(directory.parent / f"{directory.name}.jsonl", sentences(documents, seed))
    prepare(ByteTokenizer(), [source], directory, block_size=BLOCK_SIZE, blocks_per_shard=64)
    return directory


def tiny_inputs(directory: Path) -> TinyInputs:
    """Model config, training data (about 1000 blocks) and validation data (about 95 blocks) under
    `directory`, made once: a second call with the same directory reuses them."""
    inputs = TinyInputs(directory / "model.json", directory / "train", directory / "valid")
    if not inputs.model.is_file():
        write_model_config(inputs.model)
    if not inputs.data.is_dir():
        prepare_tiny_data(inputs.data, 600, seed=0)
    if not inputs.validation.is_dir():
        prepare_tiny_data(inputs.validation, 60, seed=1)
    return inputs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, os.PathLike)):
        return json.dumps(str(value))  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def train_settings(inputs: TinyInputs, output: Path, **overrides: Any) -> dict[str, Any]:
    """The training config (as plain values) of a tiny run on `inputs` into `output`."""
    settings = {"model": str(inputs.model), "data": [str(inputs.data)],
                "validation": {"valid": str(inputs.validation)}, "output": str(output),
                **TRAIN_DEFAULTS}
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(settings.get(key), Mapping):
            value = {**settings[key], **value}
        settings[key] = value
    return settings


def write_train_config(path: Path, inputs: TinyInputs, output: Path, **overrides: Any) -> Path:
    """A TOML training config file for a tiny run (see TRAIN_DEFAULTS; `mesh={...}` merges)."""
    settings = train_settings(inputs, output, **overrides)
    lines, tables = [], []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{key}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in value.items()))
        else:
            lines.append(f"{key} = {_toml_value(value)}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines) + "".join(tables))
    return path


def train_env(devices: int = 1) -> dict[str, str]:
    """The environment of a training subprocess: CPU JAX with `devices` devices, the repo importable."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_json_script(script: str, devices: int, timeout: float) -> Any:
    """Runs Python `script` in a subprocess with `devices` CPU devices (JAX fixes the count when it
    starts); returns the JSON its last line of stdout prints."""
    result = subprocess.run([sys.executable, "-c", script], env=train_env(devices), cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def train_command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "hammer", "train", "--config", str(config), *overrides]


def run_train(config: Path, *overrides: str, devices: int = 1, timeout: float = 300,
              ) -> subprocess.CompletedProcess:
    """`hammer train --config CONFIG OVERRIDES...` in a subprocess; stdout/stderr captured as text."""
    return subprocess.run(train_command(config, *overrides), env=train_env(devices), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def start_train(config: Path, *overrides: str, log: Path, devices: int = 1) -> subprocess.Popen:
    """The same, started and left running (for tests that kill or signal it); its stderr goes to
    `log`, which `wait_until` shows when the run ends too early."""
    with log.open("w") as stderr:
        return subprocess.Popen(train_command(config, *overrides), env=train_env(devices), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=stderr)


def wait_until(proc: subprocess.Popen, condition, log: Path, timeout: float = 300) -> None:
    """Polls `condition` while the started run lives; fails with the run's stderr if it ends first."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, (f"the run ended (exit {proc.returncode}) before the awaited "
                                     f"moment:\n{log.read_text()[-3000:]}")
        assert time.time() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)


def train_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of a run's train records (metrics.jsonl)."""
    from hammer.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"}
