"""`hammer train`: pretrain a Llama on prepared data with the JAX trainer or the torch twin's.

Rerunning the same command on the same output directory resumes from its newest good checkpoint.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hammer.commands import examples
from hammer.train_config import BACKENDS, load_train_config


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="pretrain a Llama (JAX, or the torch twin)",
                              description=__doc__, **examples(
                                  "hammer train --config configs/tiny.toml steps=100 output=runs/tiny",
                                  "hammer train --config configs/hammerllm-1.4b.toml mesh.fsdp=8 data=runs/data",
                                  "torchrun --nproc_per_node=8 -m hammer train --backend torch "
                                  "--config configs/hammerllm-1.4b.toml"))
    p.add_argument("--config", type=Path, help="TOML training config (see configs/*.toml)")
    p.add_argument("--backend", choices=BACKENDS, help="the trainer (default jax; same as backend=...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config keys set on top of the file, e.g. steps=100 mesh.fsdp=4")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    overrides = [*args.overrides, *([f"backend={args.backend}"] if args.backend else [])]
    config = load_train_config(args.config, overrides)
    if config.backend == "jax":
        from hammer_jax.train import train
    else:
        from hammer_torch.train import train
    train(config)
