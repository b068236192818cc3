"""`hammer train` with the JAX backend, end to end on CPU: loss falls, a killed run resumes to the
very same losses, SIGTERM saves, a corrupted checkpoint falls back to the previous one, a changed
run is refused, bad configs leave nothing, and a checkpoint is a model the other commands read."""
import gzip
import json
import re
import shutil
import signal

import numpy as np
import pytest

from hammer.cli import main
from tests.train_fixtures import (run_train, start_train, train_losses, train_settings,
                                  wait_until, write_train_config)

STEPS = 12


@pytest.fixture(scope="module")
def inputs(train_inputs):
    return train_inputs


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    """A 12-step run on 8 devices (mesh 1 x 4 x 2), checkpoints every 4 steps, eval every 4, steps
    5..6 profiled."""
    root = tmp_path_factory.mktemp("uninterrupted")
    config = write_train_config(root / "c.toml", inputs, root / "run", steps=STEPS,
                                checkpoint_every=4, eval_every=4, mesh={"fsdp": -1, "tensor": 2},
                                profile_steps=[5, 6])
    result = run_train(config, devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, root / "run", result


@pytest.mark.slow
def test_loss_falls_and_every_record_is_written(uninterrupted):
    _, run, result = uninterrupted
    losses = train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 1.0, losses  # measured 5.58 -> 3.6
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert train[0]["lr"] == 0.0  # the first update uses lr(0)
    assert train[0]["tokens"] == 8 * 32 and train[-1]["tokens"] == STEPS * 8 * 32
    for key in ("grad_norm", "tokens_per_s", "tokens_per_s_per_device", "step_time"):
        assert all(r[key] > 0 for r in train), key
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8, 12]
    assert evals[-1]["domains"]["valid"]["loss"] < evals[0]["domains"]["valid"]["loss"]
    assert evals[0]["domains"]["valid"]["ppl"] == pytest.approx(np.exp(evals[0]["domains"]["valid"]["loss"]))
    # The odd vocabulary (259) is padded to 128 x the tensor axis, so tensor=2 splits it too.
    assert "replicated" not in result.stderr, result.stderr[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["12", "4", "8"]


@pytest.mark.slow
def test_profile_steps_leave_a_trace_that_names_the_step_function(uninterrupted):
    _, run, _ = uninterrupted
    traces = list((run / "profile").rglob("*.xplane.pb"))
    perfetto = list((run / "profile").rglob("perfetto_trace.json.gz"))
    assert len(traces) == 1 and len(perfetto) == 1
    assert "jit_step" in gzip.decompress(perfetto[0].read_bytes()).decode()


@pytest.mark.slow
def test_a_run_that_differs_only_in_lr_and_steps_compiles_nothing_new(inputs, tmp_path):
    cache = tmp_path / "xla"
    config = write_train_config(tmp_path / "c.toml", inputs, tmp_path / "a", steps=2,
                                checkpoint_every=2, compilation_cache=str(cache))
    assert run_train(config).returncode == 0
    entries = sorted(p.name for p in cache.iterdir())
    assert any("step" in name for name in entries), entries
    other = run_train(config, f"output={tmp_path / 'b'}", "lr=0.001", "steps=3", "warmup_steps=1")
    assert other.returncode == 0, other.stderr[-3000:]
    assert sorted(p.name for p in cache.iterdir()) == entries


@pytest.mark.slow
def test_a_checkpoint_is_a_model_convert_and_jax_read(uninterrupted, tmp_path):
    import convert
    import hammer_jax

    _, run, _ = uninterrupted
    config, tensors = convert.read_checkpoint(run)  # the run directory: its newest step
    assert config.vocab_size == 259 and "lm_head.weight" in tensors
    model = hammer_jax.from_pretrained(run / "checkpoints" / "8")
    logits = model(np.array([[1, 5, 7]], np.int32))
    assert logits.shape == (1, 3, 259)
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf"]) == 0
    _, exported = convert.load_hf(tmp_path / "hf")
    np.testing.assert_array_equal(exported["lm_head.weight"], tensors["lm_head.weight"])


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_losses_bitwise(uninterrupted, tmp_path):
    config, run, _ = uninterrupted
    killed = tmp_path / "run"
    log = tmp_path / "killed.stderr"
    proc = start_train(config, f"output={killed}", log=log, devices=8)
    wait_until(proc, lambda: (killed / "checkpoints" / "4" / "commit_success.txt").exists(), log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run_train(config, f"output={killed}", devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed_from = int(re.search(r"resuming .* from step (\d+)", result.stderr).group(1))
    assert 4 <= resumed_from < STEPS  # killed before its last checkpoint: a real resume
    expected, resumed = train_losses(run), train_losses(killed)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # one clean curve
    assert {s: resumed[s] for s in range(5, STEPS + 1)} == {s: expected[s] for s in range(5, STEPS + 1)}


@pytest.mark.slow
def test_a_corrupted_latest_checkpoint_falls_back_to_the_previous_one(uninterrupted, tmp_path):
    config, run, _ = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for f in (copy / "checkpoints" / "12" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    result = run_train(config, f"output={copy}", devices=8)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint" in result.stderr and "12 is unreadable" in result.stderr
    assert "from step 8" in result.stderr
    assert train_losses(copy) == train_losses(run)  # steps 9..12 again, bit for bit
    assert (copy / "checkpoints-unreadable" / "12").is_dir()  # set aside, not deleted


@pytest.mark.slow
def test_a_checkpoint_of_other_shapes_is_refused_naming_the_tensor_and_nothing_is_moved(
        uninterrupted, tmp_path):
    import orbax.checkpoint as ocp

    import convert

    config, run, _ = uninterrupted
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    # Step 12 rewritten with the down projections [in, out], as hammer wrote kernels before.
    params_dir = copy / "checkpoints" / "12" / "params"
    params = convert.load_jax(params_dir.parent)[1]
    layers = params["layers"]
    stacked = "mlp" in layers
    for layer in [layers] if stacked else layers.values():
        layer["mlp"]["down_proj"]["kernel"] = np.swapaxes(layer["mlp"]["down_proj"]["kernel"], -1, -2)
    shutil.rmtree(params_dir)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(params_dir, params)
    result = run_train(config, f"output={copy}", devices=8)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "down_proj.kernel of shape" in result.stderr
    assert "[in, out] kernels of hammer" in result.stderr
    assert not (copy / "checkpoints-unreadable").exists() and params_dir.is_dir()


@pytest.mark.slow
def test_scanned_layers_train_and_resume_and_the_other_layout_is_refused(inputs, tmp_path):
    config = write_train_config(tmp_path / "c.toml", inputs, tmp_path / "run", steps=4,
                                checkpoint_every=2, scan_layers=True, mesh={"fsdp": 2})
    result = run_train(config, devices=2)  # the stacked weights sharded over fsdp
    assert result.returncode == 0, result.stderr[-3000:]
    run, copy = tmp_path / "run", tmp_path / "copy"
    losses = train_losses(run)
    assert losses[4] < losses[1], losses
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "4")  # as if killed before saving step 4
    result = run_train(config, f"output={copy}", devices=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from step 2" in result.stderr
    assert train_losses(copy) == losses  # steps 3 and 4 again, bit for bit
    # Per-layer params cannot restore into stacked ones: refused, nothing set aside or rewritten.
    before = (copy / "run.json").read_text()
    result = run_train(config, f"output={copy}", "scan_layers=false", devices=2)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "another scan_layers (scan_layers: True -> False)" in result.stderr
    assert not (copy / "checkpoints-unreadable").exists() and (copy / "run.json").read_text() == before


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_0(inputs, tmp_path):
    run = tmp_path / "run"
    config = write_train_config(tmp_path / "c.toml", inputs, run, steps=100_000,
                                checkpoint_every=100_000)
    log = tmp_path / "run.stderr"
    proc = start_train(config, log=log)
    wait_until(proc, lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text(),
               log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    saved = [int(p.name) for p in (run / "checkpoints").iterdir()]
    assert len(saved) == 1 and saved[0] >= 1 and saved[0] == max(train_losses(run))


@pytest.mark.slow
def test_a_changed_run_is_refused_naming_the_key(uninterrupted):
    config, run, _ = uninterrupted
    before = (run / "metrics.jsonl").read_text()
    result = run_train(config, "lr=0.001", devices=8)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "lr" in result.stderr
    assert (run / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("override, expected", [
    (["lrr=0.1"], "did you mean lr"),
    (["batch_size=7", "grad_accum=2"], "batch_size"),  # no 2 equal micro-batches of 7
    (["mesh.data=2"], "mesh"),
    (["data=/nonexistent/data"], "/nonexistent/data"),
    (["eval_batch_size=1000"], "eval_batch_size"),
    (["grad_accum=3"], "grad_accum"),
    (["attention_impl=flash_attn"], "attention_impl"),
    (["init=/nonexistent/model"], "init"),
])
def test_every_bad_config_is_one_line_and_leaves_no_run_directory(inputs, tmp_path, capsys,
                                                                  override, expected):
    run = tmp_path / "run"
    config = write_train_config(tmp_path / "c.toml", inputs, run)
    assert main(["train", "--config", str(config), *override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not run.exists()


def test_grad_accum_auto_takes_the_fewest_micro_batches_that_fit_and_records_them(inputs, tmp_path,
                                                                                 capsys):
    from hammer.config import ConfigError
    from hammer.train_config import from_dict
    from hammer_jax.train import train

    # the tiny model's step on one device: 4.7 MiB with 8 sequences, 3.5 MiB with 4, 2.7 MiB with 2
    settings = train_settings(inputs, tmp_path / "run", grad_accum="auto", steps=2,
                              memory_limit_gb=4 / 1024)
    train(from_dict(settings))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["grad_accum"] == 2
    assert "grad_accum = auto: 2 micro-batches of 4 sequences" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"no micro-batch fits 1\.0 MiB .*1 sequences: 2\.\d MiB"):
        train(from_dict({**settings, "output": str(tmp_path / "small"), "memory_limit_gb": 1 / 1024,
                         "batch_size": 2, "eval_batch_size": 2}))
    assert not (tmp_path / "small").exists()


def test_the_profiler_starts_and_stops_only_after_the_pending_checkpoint_save(monkeypatch,
                                                                               tmp_path):
    """JAX's profiler crashed the process beside orbax's save thread (bench/profile_during_save.py)."""
    import jax
    from hammer_jax.train import JaxTrainer

    events = []

    class Saves:
        def wait(self):
            events.append("save finished")

    monkeypatch.setattr(jax.profiler, "start_trace", lambda *a, **k: events.append("start"))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: events.append("stop"))
    trainer = object.__new__(JaxTrainer)  # the two methods need only the checkpoints and the state
    trainer.checkpoints, trainer.state = Saves(), jax.numpy.zeros(())
    trainer.start_profile(tmp_path)
    trainer.stop_profile()
    assert events == ["save finished", "start", "save finished", "stop"]
