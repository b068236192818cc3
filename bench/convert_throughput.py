"""Checkpoint conversion against the speed and memory of its own I/O.

A random bfloat16 HF checkpoint of the config's size (HammerLLM-1.4B by default) is written with
safetensors, then each row runs in its own process, so peak RSS is that process's own (os.wait4),
and starts after `sync`, so that no row waits on the dirty pages of the one before. The rows run
in turn `--repeat` times; seconds are the median, peak RSS the largest:
- safetensors read + write: `load_file` (pread) then `save_file` of the same tensors: the I/O floor;
- safetensors read + write + fsync: the same, on disk when it returns, as orbax's writes are (it
  fsyncs every file it writes: a checkpoint is durable when its save returns);
- safetensors read + orbax save: the same tensors saved by the orbax checkpointer `convert` uses,
  unconverted: the I/O of --to jax alone (orbax also fsyncs each file it writes);
- convert --to jax: `hammer convert` of the HF directory into a hammer JAX (orbax) directory;
- orbax restore + safetensors write: that JAX directory's tree restored whole and saved as
  safetensors, unconverted: the I/O of --to hf alone;
- convert --to hf: that JAX directory back to HF, whose tensors must equal the source's bits;
- convert --to torch: the HF directory through the torch twin.
The time ratios are to the first row, to the second, and for each conversion to its own I/O (the
row of the same reader and writer, unconverted); RSS is to the model's bytes. Writes JSON and
prints a table.

    python bench/convert_throughput.py [--config configs/hammerllm-1.4b.json] [--repeat 3] [--smoke] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from convert import tensors as config_tensors  # noqa: E402
from convert.hf import DTYPES  # noqa: E402
from hammer.config import ModelConfig  # noqa: E402
from hammer.fsio import atomic_file  # noqa: E402

SAFETENSORS_ROUND_TRIP = ("import ml_dtypes, os, sys; from safetensors.numpy import load_file, save_file; "
                          "save_file(load_file(sys.argv[1], backend='pread'), sys.argv[2], metadata={'format': 'pt'})")
FSYNC = "; fd = os.open(sys.argv[2], os.O_RDONLY); os.fsync(fd); os.close(fd)"
# The I/O of each direction alone, through the writer and reader `convert` uses for JAX directories.
SAFETENSORS_TO_ORBAX = ("import os, sys; import orbax.checkpoint as ocp; from safetensors.numpy import load_file; "
                        "from convert.jax_checkpoint import _checkpointer; c = _checkpointer(); "
                        "c.save(os.path.abspath(sys.argv[2]), args=ocp.args.PyTreeSave("
                        "load_file(sys.argv[1], backend='pread'))); c.close()")
ORBAX_TO_SAFETENSORS = ("import os, sys; import jax, numpy as np; import orbax.checkpoint as ocp; "
                        "from safetensors.numpy import save_file; "
                        "from convert.jax_checkpoint import _checkpointer; from convert.mapping import _flatten; "
                        "c = _checkpointer(); path = os.path.abspath(sys.argv[1]); "
                        "tree = c.restore(path, args=ocp.args.PyTreeRestore(restore_args=jax.tree.map("
                        "lambda _: ocp.RestoreArgs(restore_type=np.ndarray), c.metadata(path).item_metadata.tree))); "
                        "save_file({'.'.join(map(str, k)): x for k, x in _flatten(tree)}, sys.argv[2], "
                        "metadata={'format': 'pt'})")


def write_random_checkpoint(config: ModelConfig, dst: Path, seed: int = 0) -> int:
    """config.json and a model.safetensors of N(0, 0.02) weights (norms 1 + N(0, 0.02)) in bfloat16,
    as a trained checkpoint's bytes look to a compressor; returns the weights' bytes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    bf16 = DTYPES["bfloat16"]
    weights = {}
    for t in config_tensors(config):
        x = rng.standard_normal(t.hf_shape, dtype=np.float32)
        x *= 0.02
        if len(t.hf_shape) == 1:
            x += 1
        weights[t.hf] = x.astype(bf16)
    dst.mkdir(parents=True)
    config.save(dst, dtype="bfloat16")
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return sum(x.nbytes for x in weights.values())


def measure(name: str, argv: list[str]) -> dict:
    """Seconds and peak RSS of one child process running argv (it must succeed)."""
    os.sync()
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, os.environ)
    _, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed ({' '.join(argv)}): exit {os.waitstatus_to_exitcode(status)}")
    return {"step": name, "seconds": round(seconds, 3), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two safetensors files hold the same names, dtypes and bits, one tensor at a time."""
    from safetensors import safe_open

    with safe_open(a, framework="numpy") as fa, safe_open(b, framework="numpy") as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            return False
        for name in fa.keys():
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "hammerllm-1.4b.json")
    parser.add_argument("--smoke", action="store_true", help="configs/tiny.json: a quick check that it runs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "convert_throughput.json")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each row; the table shows the median")
    parser.add_argument("--workdir", type=Path, help="where the checkpoints go (default: a temporary directory)")
    args = parser.parse_args()
    config_path = REPO / "configs" / "tiny.json" if args.smoke else args.config
    config = ModelConfig.from_hf(config_path)

    workdir = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.workdir))
    # A child's peak RSS starts from its parent's (exec records it), so this process holds no
    # weights: the checkpoint is made and compared in helper processes of their own.
    helper = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    try:
        src = workdir / "hf"
        model_bytes = helper.submit(write_random_checkpoint, config, src).result()
        hammer = [sys.executable, "-m", "hammer.cli", "convert"]
        copy = [str(src / "model.safetensors"), str(workdir / "copy.safetensors")]
        steps = {  # name -> (argv, what it wrote)
            "safetensors read + write": ([sys.executable, "-c", SAFETENSORS_ROUND_TRIP, *copy],
                                         workdir / "copy.safetensors"),
            "safetensors read + write + fsync": ([sys.executable, "-c", SAFETENSORS_ROUND_TRIP + FSYNC, *copy],
                                                 workdir / "copy.safetensors"),
            "safetensors read + orbax save": ([sys.executable, "-c", SAFETENSORS_TO_ORBAX, copy[0],
                                               str(workdir / "orbax")], workdir / "orbax"),
            "convert --to jax": ([*hammer, str(src), str(workdir / "jax"), "--to", "jax"], None),
            "orbax restore + safetensors write": ([sys.executable, "-c", ORBAX_TO_SAFETENSORS,
                                                   str(workdir / "jax" / "params"), copy[1]],
                                                  workdir / "copy.safetensors"),
            "convert --to hf (from jax)": ([*hammer, str(workdir / "jax"), str(workdir / "back"), "--to", "hf"],
                                           workdir / "back"),
            "convert --to torch": ([*hammer, str(src), str(workdir / "torch"), "--to", "torch"],
                                   workdir / "torch"),
        }
        runs: dict[str, list[dict]] = {name: [] for name in steps}
        bit_exact = True
        # The rows take turns, so that a slow spell of a shared disk falls on all of them.
        for _ in range(args.repeat):
            for name, (argv, output) in steps.items():
                runs[name].append(measure(name, argv))
                if name == "convert --to hf (from jax)":
                    bit_exact &= helper.submit(same_tensors, src / "model.safetensors",
                                               output / "model.safetensors").result()
                    shutil.rmtree(workdir / "jax")
                if output is not None:
                    shutil.rmtree(output) if output.is_dir() else output.unlink()
        rows = [{"step": name, "seconds": round(statistics.median(r["seconds"] for r in each), 3),
                 "seconds_each": [r["seconds"] for r in each],
                 "peak_rss_gb": max(r["peak_rss_gb"] for r in each)} for name, each in runs.items()]
    finally:
        helper.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    floor, durable = rows[0]["seconds"], rows[1]["seconds"]
    seconds = {row["step"]: row["seconds"] for row in rows}
    own_io = {"convert --to jax": "safetensors read + orbax save",
              "convert --to hf (from jax)": "orbax restore + safetensors write",
              "convert --to torch": "safetensors read + write"}
    for row in rows:
        row["time_ratio"] = round(row["seconds"] / floor, 2)
        row["time_ratio_to_fsync_floor"] = round(row["seconds"] / durable, 2)
        if row["step"] in own_io:
            row["time_ratio_to_own_io"] = round(row["seconds"] / seconds[own_io[row["step"]]], 2)
        row["rss_ratio_to_model_bytes"] = round(row["peak_rss_gb"] * 1e9 / model_bytes, 2)
    result = {
        "config": config_path.name, "parameters": config.param_count(), "model_gb": round(model_bytes / 1e9, 3),
        "dtype": "bfloat16", "round_trip_bit_exact": bit_exact, "rows": rows,
        "machine": {"cpus": os.cpu_count(), "load_at_end": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(), "platform": platform.platform()},
    }
    with atomic_file(args.out) as f:
        f.write(json.dumps(result, indent=2) + "\n")

    print(f"{config_path.name}: {config.param_count():,} parameters, {model_bytes / 1e9:.2f} GB in bfloat16; "
          f"round trip bit-exact: {bit_exact}")
    print(f"{'step':<34}{'seconds':>9}{'peak RSS GB':>13}{'x I/O time':>12}{'x I/O+fsync':>13}"
          f"{'x own I/O':>11}{'x model bytes':>15}")
    for r in rows:
        own = f"{r['time_ratio_to_own_io']:.2f}" if "time_ratio_to_own_io" in r else ""
        print(f"{r['step']:<34}{r['seconds']:>9.2f}{r['peak_rss_gb']:>13.2f}{r['time_ratio']:>12.2f}"
              f"{r['time_ratio_to_fsync_floor']:>13.2f}{own:>11}{r['rss_ratio_to_model_bytes']:>15.2f}")
    print(f"wrote {args.out}")
    if not bit_exact:
        raise SystemExit("the HF -> JAX -> HF round trip changed the tensors")


if __name__ == "__main__":
    main()
