"""`hammer demo`: the whole pipeline on the embedded demo corpus (the stages are in hammer/demo.py)."""
from __future__ import annotations

from pathlib import Path

from hammer import demo
from hammer.commands import examples

DEMO_MODEL = Path(__file__).resolve().parents[2] / "configs" / "demo.json"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline on the embedded demo corpus",
                              description=demo.__doc__.splitlines()[0], **examples(
                                  "hammer demo --output runs/demo",
                                  "hammer demo --output runs/demo-small --max-mb 0.5 --vocab-size 2048 --steps 50"))
    p.add_argument("--output", type=Path, default=Path("runs/demo"),
                   help="working directory; stages already there are reused (default runs/demo)")
    p.add_argument("--max-mb", type=float, default=2.0, help="MiB of text per domain (default 2)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (default 8192)")
    p.add_argument("--config", type=Path, default=DEMO_MODEL,
                   help="model config.json; its vocab_size is set to the tokenizer's (default configs/demo.json)")
    p.add_argument("--steps", type=int, default=250,
                   help="optimizer steps of the JAX training run (default 250)")
    p.add_argument("--torch-steps", type=int, default=20,
                   help="steps of the torch-trainer run that follows the JAX run's first steps (default 20)")
    p.add_argument("--seed", type=int, default=3407)
    p.set_defaults(func=demo.run)
