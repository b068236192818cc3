"""What the trainer's loop costs: per backend, `hammer train`'s seconds per step (its metrics'
step_time: wall time between reads of the device, data loading included) against a bare loop of the
same compiled step on one batch already on the device (no data, no logging, no checkpoints), on a
small model on CPU. Goal: the trainer within 3% of the bare loop at log_every=10.

Rows alternate trainer and bare loop `--repeat` times; the medians are reported. Writes
bench/results/train_overhead.json ({backend: {trainer_s, bare_s, ratio}}) and prints a table.

    python bench/train_overhead.py [--steps 200] [--repeat 3] [--out bench/results]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hammer.data.loader import Loader, mixture_from_specs  # noqa: E402
from hammer.metrics import read_metrics  # noqa: E402
from hammer.train_config import from_dict  # noqa: E402
from tests.train_fixtures import tiny_inputs, train_settings, write_model_config  # noqa: E402

# Large enough that a step is tens of milliseconds on a CPU, as a step on an accelerator would be
# much longer than the loop's own work: the ratio is the loop's cost, not Python's.
MODEL = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32}
WARMUP = 10  # steps left out of both timings


def settings(inputs, model: Path, out: Path, backend: str, steps: int):
    return from_dict(train_settings(inputs, out, backend=backend, model=str(model), steps=steps,
                                    batch_size=16, log_every=10, checkpoint_every=10 * steps,
                                    eval_every=0, validation={}, compilation_cache="off"))


def trainer_seconds(config) -> float:
    if config.backend == "jax":
        from hammer_jax.train import train
    else:
        from hammer_torch.train import train
    train(config)
    records = [r for r in read_metrics(config.output) if r["kind"] == "train" and r["step"] > WARMUP]
    return sum(r["step_time"] for r in records) / len(records)


def bare_jax(config) -> float:
    import jax
    from flax import nnx

    from hammer_jax.model import Llama
    from hammer_jax.optimizer import make_optimizer
    from hammer_jax.sharding import make_mesh
    from hammer_jax.train import model_options_of
    from hammer_jax.train_step import batch_sharding, fresh_state, make_train_step

    mesh = make_mesh(config.mesh)
    model_config = config.model_config()
    tx = make_optimizer(config)
    graphdef, shardings, state = fresh_state(
        lambda: Llama(model_config, rngs=nnx.Rngs(0), **model_options_of(config)), tx, mesh)
    step = make_train_step(graphdef, tx, shardings, mesh, grad_accum=1, loss_chunk=config.loss_chunk)
    batch = jax.device_put(_batch(config), batch_sharding(mesh))
    lr = jax.numpy.float32(config.lr)
    for k in range(config.steps):
        if k == WARMUP:
            jax.block_until_ready(state)
            began = time.perf_counter()
        state, out = step(state, batch, lr)
    jax.block_until_ready(out)
    return (time.perf_counter() - began) / (config.steps - WARMUP)


def bare_torch(config) -> float:
    import torch

    from hammer_torch import train_step
    from hammer_torch.model import Llama

    with train_step.process_group() as device:
        torch.manual_seed(0)
        step = train_step.build(config, Llama(config.model_config()), device)
        rows = torch.from_numpy(_batch(config).astype(np.int64)).to(device)
        for k in range(config.steps):
            if k == WARMUP:
                began = time.perf_counter()
            loss, _, _ = step(rows, config.lr)
        loss.item()
        return (time.perf_counter() - began) / (config.steps - WARMUP)


def _batch(config) -> np.ndarray:
    return Loader(mixture_from_specs(config.data), config.batch_size, seed=config.seed).batch(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = tiny_inputs(tmp / "inputs")
        model = write_model_config(tmp / "model.json", **MODEL)
        for backend, bare in (("jax", bare_jax), ("torch", bare_torch)):
            trainer, plain = [], []
            for i in range(args.repeat):
                config = settings(inputs, model, tmp / f"{backend}-{i}", backend, args.steps)
                trainer.append(trainer_seconds(config))
                plain.append(bare(config))
            t, b = statistics.median(trainer), statistics.median(plain)
            results[backend] = {"trainer_s": t, "bare_s": b, "ratio": t / b,
                                "trainer_runs": trainer, "bare_runs": plain}
    report = {"benchmark": "train_overhead", "machine": platform.processor() or platform.machine(),
              "steps": args.steps, "log_every": 10, "batch": "16 x 32", "model": MODEL, **results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'backend':8} {'trainer s/step':>15} {'bare s/step':>12} {'ratio':>7}")
    for backend in ("jax", "torch"):
        r = results[backend]
        print(f"{backend:8} {r['trainer_s']:15.5f} {r['bare_s']:12.5f} {r['ratio']:7.3f}")


if __name__ == "__main__":
    main()
