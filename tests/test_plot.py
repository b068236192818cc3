"""`hammer plot`: the curves of several runs, overlaid, from their metrics.jsonl."""
import json

import pytest

from hammer.cli import main
from hammer.metrics import MetricsLog
from hammer.plot import draw
from hammer.run import RUN_FILE

pytest.importorskip("matplotlib")


def _run(path, backend, losses):
    path.mkdir()
    (path / RUN_FILE).write_text(json.dumps({"config": {"backend": backend}}))
    with MetricsLog(path, tensorboard=False) as log:
        for step, loss in enumerate(losses, 1):
            log.write({"step": step, "kind": "train", "loss": loss, "lr": 1e-3 * step,
                       "tokens_per_s": 100.0 + step})
            if step % 2 == 0:
                log.write({"step": step, "kind": "eval",
                           "domains": {"zh": {"loss": loss, "ppl": 2.0 ** loss}, "en": {"loss": 1.0, "ppl": 2.7}}})
    return path


def test_each_run_is_one_line_per_panel_labelled_by_its_backend(tmp_path):
    jax_run = _run(tmp_path / "jax", "jax", [5.0, 4.0, 3.0, 2.5])
    torch_run = _run(tmp_path / "torch", "torch", [5.0, 4.1, 3.1, 2.4])
    loss, lr, ppl, speed = draw([jax_run, torch_run]).axes
    assert [line.get_label() for line in loss.lines] == ["jax (jax)", "torch (torch)"]
    assert list(loss.lines[1].get_ydata()) == [5.0, 4.1, 3.1, 2.4]
    assert len(lr.lines) == len(speed.lines) == 2
    assert sorted(line.get_label() for line in ppl.lines) == [
        "jax (jax) en", "jax (jax) zh", "torch (torch) en", "torch (torch) zh"]


def test_the_command_writes_a_png_and_never_replaces_a_users_file(tmp_path, capsys):
    run = _run(tmp_path / "run", "jax", [3.0, 2.0])
    assert main(["plot", str(run)]) == 0
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mine = tmp_path / "mine.png"
    mine.write_text("keep")
    assert main(["plot", str(run), "--output", str(mine)]) == 2
    assert mine.read_text() == "keep"
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
