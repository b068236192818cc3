"""Downstream evaluation during training (`eval_tasks`): both trainers run lm-eval tasks on their live
weights at each evaluation, log the metrics beside the validation losses, and train exactly as a run
without them; a run whose tasks cannot run is refused before it starts."""
import json

import pytest

pytest.importorskip("lm_eval")

from hammer.config import ConfigError  # noqa: E402
from hammer.metrics import read_metrics  # noqa: E402
from hammer.train_config import from_dict  # noqa: E402
from tests.eval_fixtures import TEXTS, VOCAB_SIZE  # noqa: E402
from tests.test_lmeval import write_tasks  # noqa: E402
from tests.tokenizer_fixtures import write_tiny_tokenizer  # noqa: E402
from tests.train_fixtures import train_settings, write_model_config  # noqa: E402

TASKS = ["t_mc", "t_rolling"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tokenizer of the eval fixtures' vocabulary, training data made with it, a model of that
    vocabulary, and the local lm-eval tasks."""
    from hammer.data import prepare
    from tests.train_fixtures import TinyInputs

    root = tmp_path_factory.mktemp("train-tasks")
    tokenizer = write_tiny_tokenizer(root / "tokenizer", VOCAB_SIZE)
    source = root / "train.jsonl"
    source.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS * 20),
                      encoding="utf-8")
    prepare(tokenizer, [source], root / "train", block_size=32)
    model = write_model_config(root / "model.json", vocab_size=VOCAB_SIZE)
    (root / "tasks").mkdir()
    return TinyInputs(model, root / "train", root / "train"), root / "tokenizer", write_tasks(root / "tasks")


def settings(inputs, output, backend, **changes):
    data, tokenizer, tasks = inputs
    values = dict(backend=backend, tokenizer=str(tokenizer), steps=4, eval_every=2, validation={},
                  eval_tasks=TASKS, eval_tasks_path=str(tasks), eval_tasks_limit=3)
    return from_dict(train_settings(data, output, **{**values, **changes}))


def losses(run):
    return [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_tasks_run_on_the_live_weights_and_change_no_loss(inputs, tmp_path, monkeypatch, backend):
    if backend == "jax":
        from hammer_jax.train import train
    else:
        from hammer_torch.train import train
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    train(settings(inputs, tmp_path / "with", backend))
    train(settings(inputs, tmp_path / "without", backend, eval_tasks=[]))
    assert losses(tmp_path / "with") == losses(tmp_path / "without")
    evals = [r for r in read_metrics(tmp_path / "with") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert 0 <= record["tasks"]["t_mc/acc"] <= 1 and record["tasks"]["t_rolling/bits_per_byte"] > 0
    # the weights moved between the evaluations, and the metrics saw it
    assert evals[0]["tasks"]["t_rolling/bits_per_byte"] != evals[1]["tasks"]["t_rolling/bits_per_byte"]


@pytest.mark.parametrize("change, message", [
    ({"tokenizer": ""}, "eval_tasks .* needs tokenizer"),
    ({"eval_tasks": ["t_nope"]}, "unknown lm-eval task 't_nope'"),
    ({"eval_tasks_path": "/nonexistent/tasks"}, "task directory /nonexistent/tasks not found"),
])
def test_tasks_that_cannot_run_are_refused_before_the_run_starts(inputs, tmp_path, change, message):
    from hammer_jax.train import train

    with pytest.raises(ConfigError, match=message):
        train(settings(inputs, tmp_path / "run", "jax", **change))
    assert not (tmp_path / "run").exists()
