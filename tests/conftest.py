import os
from pathlib import Path

import pytest

# Tests never reach a hub; tokenizers' thread pool would warn (and may deadlock) after a fork.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_HAMMERLLM = Path(__file__).resolve().parents[2] / "shared" / "hammerllm"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def hammerllm_dir() -> Path:
    """HammerLLM's released files (../shared/hammerllm beside the checkout)."""
    if not (SHARED_HAMMERLLM / "tokenizer" / "tokenizer.model").is_file():
        pytest.skip(f"HammerLLM reference files not found at {SHARED_HAMMERLLM}")
    return SHARED_HAMMERLLM
