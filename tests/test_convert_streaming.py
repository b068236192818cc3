"""Conversion streams: it holds at most one copy of the weights, never two, in every direction.

numpy reports its allocations to tracemalloc, so the peak traced while `hammer convert` runs in
this process is the conversion's own array memory (orbax's and tensorstore's C++ buffers aside;
`bench/convert_throughput.py` measures whole-process RSS at HammerLLM-1.4B's size). The model has
many small tensors, so one copy of the weights and one tensor at a time are far apart.
"""
import json
import subprocess
import sys
import tracemalloc

import numpy as np
import orbax.checkpoint  # noqa: F401  imported before tracing: its import is not the conversion's
import pytest

import convert
import hammer.commands.convert  # noqa: F401
import hammer_torch.checkpoint  # noqa: F401
from hammer.cli import main
from hammer.config import ModelConfig
from tests.conftest import REPO
from tests.eval_fixtures import random_hf_tensors

CONFIG = ModelConfig(vocab_size=1009, hidden_size=256, intermediate_size=704, num_layers=12,
                     num_heads=8, num_kv_heads=2, head_dim=32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """An HF directory and its JAX conversion, and the weights' bytes (float32)."""
    root = tmp_path_factory.mktemp("streaming")
    tensors = random_hf_tensors(CONFIG, std=0.02)
    convert.save_hf(root / "hf", CONFIG, tensors)
    assert main(["convert", str(root / "hf"), str(root / "jax"), "--to", "jax"]) == 0
    return root, sum(x.nbytes for x in tensors.values()), max(x.nbytes for x in tensors.values())


def peak_bytes_of_convert(*argv) -> int:
    tracemalloc.start()
    try:
        assert main(["convert", *map(str, argv)]) == 0
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_hf_to_jax_holds_the_jax_tree_once_and_the_hf_tensors_one_at_a_time(checkpoints, tmp_path):
    root, model_bytes, _ = checkpoints
    peak = peak_bytes_of_convert(root / "hf", tmp_path / "jax", "--to", "jax")
    # orbax writes a whole tree; the HF tensors read first, or a copy orbax made, would be 2x.
    assert 0.9 * model_bytes <= peak <= 1.25 * model_bytes, peak / model_bytes
    # Every JAX tensor is its HF tensor reshaped: kernels keep the [out, in] layout.
    _, source = convert.load_hf(root / "hf")
    flat = dict(convert.mapping._flatten(convert.load_jax(tmp_path / "jax")[1]))
    for t in convert.tensors(CONFIG):
        x = source[t.hf]
        got = t.trimmed(flat[tuple(str(k) for k in t.jax)])  # the vocabulary's zero padding off
        assert np.array_equal(got, x.reshape(got.shape)), t.hf


@pytest.mark.parametrize("src,to,options", [("jax", "hf", []), ("hf", "hf", ["--dtype", "bfloat16"]),
                                            ("hf", "torch", [])])
def test_hf_tensors_are_made_and_written_one_at_a_time(checkpoints, tmp_path, src, to, options):
    # From JAX, tensorstore's restored tree (its own allocations, not traced here) is whole once;
    # bench/convert_throughput.py measures it. The HF tensors made from it are not: 1x more.
    root, model_bytes, largest = checkpoints
    peak = peak_bytes_of_convert(root / src, tmp_path / "out", "--to", to, *options)
    assert peak <= 4 * largest < 0.15 * model_bytes, (peak / largest, peak / model_bytes)
    _, source = convert.load_hf(root / "hf")
    _, written = convert.load_hf(tmp_path / "out")
    for name, x in source.items():
        assert written[name].tobytes() == x.astype(written[name].dtype).tobytes(), name


@pytest.mark.slow
def test_the_throughput_bench_runs_and_writes_its_table_where_asked(tmp_path):
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, "bench/convert_throughput.py", "--smoke", "--repeat", "2", "--out", str(out),
                    "--workdir", str(tmp_path)], cwd=REPO, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    assert result["round_trip_bit_exact"] is True
    assert [r["step"] for r in result["rows"]] == [
        "safetensors read + write", "safetensors read + write + fsync", "safetensors read + orbax save",
        "convert --to jax", "orbax restore + safetensors write", "convert --to hf (from jax)",
        "convert --to torch"]
    assert all(r["seconds"] > 0 and r["peak_rss_gb"] > 0 for r in result["rows"])
    assert all(len(r["seconds_each"]) == 2 for r in result["rows"])
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # its checkpoints removed
