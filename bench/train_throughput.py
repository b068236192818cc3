"""Training throughput: the JAX trainer's step (the code `hammer train` runs) against transformers'
LlamaForCausalLM (SDPA, bf16 autocast, fused AdamW, torch.compile) in one run, on one device.

    python bench/train_throughput.py                      # HammerLLM-1.4B, 8 x 2048, bf16, GPU
    python bench/train_throughput.py --smoke --out /tmp   # configs/tiny.json, tiny shapes, CPU

Each contender is one function `(args) -> row` (tokens/s, MFU, peak memory, compile time); the
torch trainer's step is a third row beside them. JSON goes to bench/results/, a table to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hammer.config import ModelConfig  # noqa: E402
from hammer.metrics import mfu, peak_flops  # noqa: E402


def batches(args, vocab: int):
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, (args.batch, args.seq)).astype(np.int32)
            for _ in range(args.warmup + args.steps)]


def timed(step, data, warmup: int, wait) -> tuple[float, float]:
    """(compile + first steps seconds, seconds per step) of `step(batch)`, whose result `wait`
    reads back: once after the warmup steps and once after the timed ones, never between, so the
    device runs ahead of the host as it does in the trainers (and in HF Trainer between logs)."""
    began = time.perf_counter()
    for batch in data[:warmup]:
        out = step(batch)
    wait(out)
    compile_s = time.perf_counter() - began
    began = time.perf_counter()
    for batch in data[warmup:]:
        out = step(batch)
    wait(out)
    return compile_s, (time.perf_counter() - began) / (len(data) - warmup)


def jax_trainer(args, config: ModelConfig) -> dict:
    import jax
    from flax import nnx

    from hammer.train_config import MeshConfig, TrainConfig
    from hammer_jax.model import Llama
    from hammer_jax.optimizer import make_optimizer
    from hammer_jax.sharding import make_mesh
    from hammer_jax.train import model_options_of
    from hammer_jax.train_step import batch_sharding, fresh_state, make_train_step

    train = TrainConfig(model=args.model, data=("-",), output="-", steps=1000, batch_size=args.batch,
                        dtype=args.dtype, remat=args.remat, scan_layers=args.scan_layers,
                        loss_chunk=args.loss_chunk, mesh=MeshConfig(data=1, fsdp=-1, tensor=1))
    mesh = make_mesh(train.mesh)
    make = lambda: Llama(config, rngs=nnx.Rngs(0), **model_options_of(train))  # noqa: E731
    tx = make_optimizer(train)
    graphdef, shardings, initial = fresh_state(make, tx, mesh)
    state = [initial]
    step_fn = make_train_step(graphdef, tx, shardings, mesh, grad_accum=1,
                              loss_chunk=args.loss_chunk)

    def step(batch):
        state[0], metrics = step_fn(state[0], jax.device_put(batch, batch_sharding(mesh)), train.lr)
        return metrics["loss"]

    compile_s, step_s = timed(step, batches(args, config.vocab_size), args.warmup, float)
    stats = jax.devices()[0].memory_stats() or {}
    return row("jax trainer", args, config, jax.devices()[0].device_kind, compile_s, step_s,
               stats.get("peak_bytes_in_use"))


def transformers_reference(args, config: ModelConfig) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = LlamaConfig(**{k: v for k, v in config.to_hf().items() if k not in ("architectures",)})
    hf._attn_implementation = "sdpa"
    model = LlamaForCausalLM(hf).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=device == "cuda")
    compiled = torch.compile(model) if device == "cuda" else model
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def step(batch):
        ids = torch.from_numpy(batch).long().to(device)
        with autocast:
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compile_s, step_s = timed(step, batches(args, config.vocab_size), args.warmup, float)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    kind = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return row("transformers (sdpa, autocast, fused adamw, compile)", args, config, kind,
               compile_s, step_s, peak)


def torch_trainer(args, config: ModelConfig) -> dict:
    """The torch trainer's step (`hammer_torch.train_step`, what `hammer train --backend torch` runs):
    DDP + ZeRO-1 over fused AdamW, bf16 autocast, chunked loss, flash/SDPA attention, per-block
    compile on CUDA, in a process group of one."""
    import torch

    from hammer.train_config import TrainConfig
    from hammer_torch import train_step
    from hammer_torch.model import Llama

    train = TrainConfig(model=args.model, data=("-",), output="-", steps=1000, batch_size=args.batch,
                        backend="torch", dtype=args.dtype, loss_chunk=args.loss_chunk,
                        remat="full" if args.remat == "full" else "none")
    with train_step.process_group() as device:
        torch.manual_seed(0)
        step_fn = train_step.build(train, Llama(config), device)

        def step(batch):
            loss, _, _ = step_fn(torch.from_numpy(batch.astype(np.int64)).to(device), train.lr)
            return loss

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        compile_s, step_s = timed(step, batches(args, config.vocab_size), args.warmup, float)
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        kind = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    return row("torch trainer (ddp+zero1, autocast, compiled blocks)", args, config, kind,
               compile_s, step_s, peak)


CONTENDERS = [jax_trainer, transformers_reference, torch_trainer]


def row(name, args, config: ModelConfig, kind: str, compile_s: float, step_s: float, peak_bytes) -> dict:
    tokens_per_s = args.batch * args.seq / step_s
    return {"contender": name, "device": kind, "tokens_per_s": tokens_per_s,
            "mfu": mfu(config.flops_per_token(args.seq), tokens_per_s, 1, peak_flops(kind)),
            "peak_memory_gib": None if peak_bytes is None else peak_bytes / 2**30,
            "compile_s": compile_s, "step_s": step_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="configs/tiny.json, 2 x 64, float32, CPU")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--tag", default="", help="suffix of the JSON file name (a variant: flags, remat...)")
    p.add_argument("--only", nargs="+", choices=[c.__name__ for c in CONTENDERS],
                   help="run these contenders only (the ratio needs transformers_reference)")
    p.add_argument("--model", default=str(REPO / "configs" / "hammerllm-1.4b.json"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--remat", default="none", choices=("none", "dots", "full"))
    p.add_argument("--scan-layers", action="store_true")
    p.add_argument("--loss-chunk", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one contender, print its row
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.batch, args.seq, args.dtype = str(REPO / "configs" / "tiny.json"), 2, 64, "float32"
        args.warmup, args.steps, args.loss_chunk = 1, 2, 64
    config = ModelConfig.from_hf(args.model)
    if args.row:
        print(ROW_MARK + json.dumps(next(c for c in CONTENDERS if c.__name__ == args.row)(args, config)))
        return 0
    names = args.only or [c.__name__ for c in CONTENDERS]
    # One process per contender: JAX and torch would otherwise share (and fight over) the GPU's
    # memory, and each peak is then its own.
    rows = [_run_row(name, argv if argv is not None else sys.argv[1:]) for name in names]
    reference = next((r["tokens_per_s"] for r, n in zip(rows, names) if n == "transformers_reference"), None)
    for r in rows:
        r["vs_reference"] = None if reference is None else r["tokens_per_s"] / reference
    result = {"model": Path(args.model).name, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
              "remat": args.remat, "scan_layers": args.scan_layers, "loss_chunk": args.loss_chunk,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "smoke": args.smoke, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "train_throughput_smoke" if args.smoke else "train_throughput"
    out = args.out / f"{name}{'_' + args.tag if args.tag else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'contender':54} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'compile s':>9} {'ratio':>6}")
    for r in rows:
        mfu_text = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        ratio = "-" if r["vs_reference"] is None else f"{r['vs_reference']:.2f}"
        print(f"{r['contender']:54} {r['tokens_per_s']:>10.0f} {mfu_text:>6} {mem:>9} "
              f"{r['compile_s']:>9.1f} {ratio:>6}")
    print(f"written {out}")
    return 0


ROW_MARK = "ROW "


def _run_row(name: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *argv, "--row", name], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith(ROW_MARK))
    return json.loads(line[len(ROW_MARK):])


if __name__ == "__main__":
    sys.exit(main())
