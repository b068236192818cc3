"""lm-evaluation-harness tasks on a hammer model: `hammer eval --tasks`, and a trainer's downstream
evaluation of its live parameters (`downstream_metrics`).

Tasks come from lm-eval's registry and from `include_path` (a directory of task YAML files, local data
files included); the model is a `hammer.lmeval.HammerLM`, so nothing is converted.
"""
from __future__ import annotations

import os
import random
from typing import Sequence

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from hammer.eval import EvalError
from hammer.lmeval import HammerLM, NewStepper, ScoresGreedy


def run_tasks(lm: HammerLM, tasks: Sequence[str], *, limit: int | None = None,
              include_path: str | os.PathLike | None = None, log_samples: bool = False,
              bootstrap_iters: int = 100000, seed_globals: bool = True) -> dict:
    """lm-eval's own result dict (`results`, `configs`, ... and `samples` with log_samples)."""
    if limit is not None and limit < 1:
        raise EvalError(f"limit must be >= 1 (documents per task), got {limit}")
    manager = checked_tasks(tasks, include_path)
    # lm-eval seeds Python's, numpy's and torch's global generators unless told None: a training run
    # keeps its own.
    seeds = {} if seed_globals else dict(random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    return simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                           log_samples=log_samples, bootstrap_iters=bootstrap_iters, **seeds)


def checked_tasks(tasks: Sequence[str], include_path: str | os.PathLike | None) -> TaskManager:
    """The task index holding every one of `tasks`; an unknown task or directory is refused."""
    if not tasks:
        raise EvalError("no lm-eval tasks given")
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"task directory {include_path} not found")
    manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(f"unknown lm-eval task {unknown[0]!r}: not among lm-eval's tasks"
                        + ("" if include_path else " (local task YAMLs need --include-path)"))
    return manager


def task_manager(tasks: Sequence[str], include_path: str | os.PathLike | None) -> TaskManager:
    """lm-eval's index of tasks; only the local ones when they are all that is asked for (indexing
    lm-eval's own ~15000 task YAMLs takes 15 s, a trainer's local tasks a tenth of a second)."""
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=None if include_path is None else str(include_path))


def flat_metrics(results: dict) -> dict[str, float]:
    """`{"TASK/METRIC": value}` for every numeric metric (lm-eval's `,none` filter suffix dropped)."""
    flat = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in metric or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            name = metric if filter_name == "none" else f"{metric},{filter_name}"
            flat[f"{task}/{name}"] = float(value)
    return flat


def downstream_metrics(scorer: ScoresGreedy, tokenizer, tasks: Sequence[str], *, limit: int | None = None,
                       include_path: str | os.PathLike | None = None, new_stepper: NewStepper | None = None,
                       batch_size: int = 8) -> dict[str, float]:
    """The tasks' metrics for a model in training, as `{"TASK/METRIC": value}`.

    `scorer` reads the live weights (`hammer_jax.scorer.JaxScorer` over the trainer's model,
    `hammer_torch.scorer.TorchScorer.from_twin` over its module); generation tasks also need
    `new_stepper`. Standard errors are not bootstrapped, and the global random generators are left as
    they were (numpy's and torch's are not touched; lm-eval draws from Python's, restored after).
    """
    lm = HammerLM(scorer, tokenizer, new_stepper=new_stepper, batch_size=batch_size)
    state = random.getstate()
    try:
        return flat_metrics(run_tasks(lm, tasks, limit=limit, include_path=include_path,
                                      bootstrap_iters=0, seed_globals=False))
    finally:
        random.setstate(state)
