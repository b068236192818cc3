import os
from pathlib import Path

import pytest

# Tests never reach a hub; tokenizers' thread pool would warn (and may deadlock) after a fork.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_HAMMERLLM = Path(__file__).resolve().parents[2] / "shared" / "hammerllm"
REPO = Path(__file__).resolve().parents[1]

# Every JAX process of the suite (this one and each `hammer train` or script it starts, which
# inherit the environment) shares XLA's persistent compilation cache: the suite compiles the same
# tiny models' steps many times. Kept between runs under .pytest_cache (the everyday loop); a
# fresh clone (CI) fills it as it goes. The trainer's compilation_cache = "auto" defers to it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def hammerllm_dir() -> Path:
    """HammerLLM's released files (../shared/hammerllm beside the checkout)."""
    if not (SHARED_HAMMERLLM / "tokenizer" / "tokenizer.model").is_file():
        pytest.skip(f"HammerLLM reference files not found at {SHARED_HAMMERLLM}")
    return SHARED_HAMMERLLM


@pytest.fixture(scope="session")
def train_inputs(tmp_path_factory):
    """The trainer tests' tiny model config, training and validation data (tests/train_fixtures.py),
    made once a session; tests read them and write their runs elsewhere."""
    from tests.train_fixtures import tiny_inputs

    return tiny_inputs(tmp_path_factory.mktemp("train-inputs"))
