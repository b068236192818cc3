"""What bfloat16 costs in loss, per trainer: the same tiny run in float32 and in bfloat16 on each
backend, from the same initial weights on the same batches.

The torch trainer runs forward under autocast: matmuls in bfloat16, the residual stream float32
(an autocast matmul's bfloat16 output added to the float32 stream is promoted). The JAX trainer keeps
the residual stream itself in bfloat16. Rows: final train loss (mean of the last 10 steps) and
validation loss of each run, and the gap of each bfloat16 run to its backend's float32 run.
Rows of a backend whose trainer is not installed are left out. Writes
bench/results/mixed_precision_loss.json and prints a table (BUILD.md, "Mixed precision", quotes it).

    python bench/mixed_precision_loss.py [--steps 200] [--out bench/results]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hammer.metrics import read_metrics  # noqa: E402
from hammer.train_config import from_dict  # noqa: E402
from tests.train_fixtures import tiny_inputs, train_settings  # noqa: E402  (the tiny grammar corpus)


def run(backend: str, dtype: str, inputs, init: Path, out: Path, steps: int) -> dict:
    config = from_dict(train_settings(inputs, out, backend=backend, dtype=dtype, init=str(init),
                                      steps=steps, warmup_steps=steps // 10, lr=3e-3, batch_size=8,
                                      checkpoint_every=steps, eval_every=steps, eval_batches=0,
                                      log_every=1))
    if backend == "torch":
        from hammer_torch.train import train
    else:
        from hammer_jax.train import train
    train(config)
    records = read_metrics(out)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    return {"backend": backend, "dtype": dtype, "train_loss": sum(losses[-10:]) / 10,
            "valid_loss": evals[-1]["domains"]["valid"]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    backends = [b for b, module in (("torch", "hammer_torch.train"), ("jax", "hammer_jax.train"))
                if importlib.util.find_spec(module)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = tiny_inputs(tmp / "inputs")
        init = _initial_weights(inputs, tmp / "init")
        for backend in backends:
            for dtype in ("float32", "bfloat16"):
                rows.append(run(backend, dtype, inputs, init, tmp / f"{backend}-{dtype}", args.steps))
    for row in rows:
        base = next(r for r in rows if r["backend"] == row["backend"] and r["dtype"] == "float32")
        row["valid_gap"] = row["valid_loss"] - base["valid_loss"]
        row["valid_gap_relative"] = row["valid_gap"] / base["valid_loss"]
    result = {"steps": args.steps, "model": "tests/train_fixtures.MODEL (hidden 64, 2 layers)",
              "machine": platform.machine(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixed_precision_loss.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'backend':8} {'dtype':9} {'train loss':>10} {'valid loss':>10} {'valid gap':>10} {'rel':>9}")
    for r in rows:
        print(f"{r['backend']:8} {r['dtype']:9} {r['train_loss']:10.5f} {r['valid_loss']:10.5f} "
              f"{r['valid_gap']:+10.5f} {r['valid_gap_relative']:+9.2e}")


def _initial_weights(inputs, dst: Path) -> Path:
    """One random initialization, as an HF directory both trainers take as `init`."""
    import torch

    from hammer.config import ModelConfig
    from hammer_torch import Llama, save_pretrained

    torch.manual_seed(0)
    return save_pretrained(Llama(ModelConfig.from_hf(inputs.model)), dst)


if __name__ == "__main__":
    main()
