"""Training curves of one or more runs from their metrics.jsonl, drawn into one PNG.

Four panels over optimizer steps: training loss, learning rate, validation perplexity per domain
and tokens per second. Runs are overlaid, each labelled by its directory name and backend, so a JAX
run and a torch run of one config show side by side. matplotlib's object API is used (a Figure of
its own, no pyplot state), with the Agg canvas: no display needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from hammer.errors import HammerError
from hammer.fsio import atomic_file
from hammer.metrics import read_metrics
from hammer.run import RUN_FILE


def _run_label(run_dir: Path) -> str:
    run_file = run_dir / RUN_FILE
    backend = json.loads(run_file.read_text())["config"]["backend"] if run_file.is_file() else "?"
    return f"{run_dir.name} ({backend})"


def plot_runs(run_dirs: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Writes the curves of `run_dirs` to the PNG `output` (atomically) and returns its path."""
    fig = draw(run_dirs)
    output = Path(output)
    with atomic_file(output, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return output


def draw(run_dirs: Sequence[str | os.PathLike]):
    """The matplotlib Figure of `run_dirs`' curves: axes loss, lr, perplexity, tokens/s."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [(_run_label(Path(d)), read_metrics(d)) for d in run_dirs]
    if not any(records for _, records in runs):
        raise HammerError(f"no metrics recorded yet in {', '.join(map(str, run_dirs))}")
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    (loss_ax, lr_ax), (ppl_ax, speed_ax) = fig.subplots(2, 2)
    for label, records in runs:
        train = [r for r in records if r.get("kind", "train") == "train"]
        steps = [r["step"] for r in train]
        loss_ax.plot(steps, [r["loss"] for r in train], label=label)
        lr_ax.plot(steps, [r["lr"] for r in train], label=label)
        speed_ax.plot(steps, [r.get("tokens_per_s") for r in train], label=label)
        evals = [r for r in records if r.get("kind") == "eval"]
        for domain in sorted({d for r in evals for d in r["domains"]}):
            points = [(r["step"], r["domains"][domain]["ppl"]) for r in evals if domain in r["domains"]]
            ppl_ax.plot(*zip(*points), marker="o", label=f"{label} {domain}")
    for ax, title in ((loss_ax, "training loss"), (lr_ax, "learning rate"),
                      (ppl_ax, "validation perplexity"), (speed_ax, "tokens/s")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    if ppl_ax.lines:
        ppl_ax.set_yscale("log")
    return fig
