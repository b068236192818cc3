"""The training config both trainers read, the run directory's resume check, and the metrics log."""
import dataclasses
import json
import re

import pytest

from hammer.config import ConfigError, ModelConfig
from hammer.metrics import DivergedError, MetricsLog, check_finite, mfu, peak_flops, read_metrics
from hammer.run import FREE_KEYS, FROZEN_KEYS, RUN_FILE, data_position, open_run
from hammer.train_config import MeshConfig, TrainConfig, load_train_config

REPO_CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs"
BASE = ["model=configs/tiny.json", "data=runs/d", "output=runs/o", "steps=10", "batch_size=8"]


def test_hammerllm_recipe_is_the_recipe_it_trained_with():
    c = load_train_config(REPO_CONFIGS / "hammerllm-1.4b.toml")
    assert (c.lr, c.warmup_steps, c.min_lr_ratio, c.weight_decay) == (5e-4, 2000, 0.1, 0.0)
    assert (c.adam_beta1, c.adam_beta2, c.adam_eps, c.max_grad_norm, c.seed) == (0.9, 0.999, 1e-8, 1.0, 3407)
    # 8 sequences x 16 accumulation steps x 8 GPUs = 1024 sequences of 2048 tokens: 2M tokens a step.
    assert (c.batch_size, c.grad_accum, c.micro_batch_size, c.dtype) == (1024, 16, 64, "bfloat16")
    model = ModelConfig.from_hf((REPO_CONFIGS.parent / c.model))
    assert c.batch_size * model.max_position_embeddings == 2 * 2**20
    assert load_train_config(REPO_CONFIGS / "tiny.toml").steps > 0
    # Nothing beyond the recipe is on unless asked for.
    assert (c.schedule, c.z_loss, c.document_mask, c.spike_skip) == ("cosine_clamped", 0.0, False, False)


def test_the_small_config_beyond_the_recipe_turns_every_such_key_on():
    c = load_train_config(REPO_CONFIGS / "tiny-beyond.toml")
    assert (c.schedule, c.decay_steps, c.decay_shape) == ("wsd", 50, "1-sqrt")
    assert (c.z_loss, c.document_mask, c.spike_skip, c.spike_window) == (1e-4, True, True, 32)
    assert c.model == load_train_config(REPO_CONFIGS / "tiny.toml").model


@pytest.mark.parametrize("override, message", [
    ("z_loss=-1e-4", "z_loss = -0.0001 is impossible; expected >= 0 (0: off)"),
    ("spike_window=1", "spike_window = 1 is impossible; expected >= 2"),
    ("spike_sigmas=0", "spike_sigmas = 0.0 is impossible; expected > 0"),
    ("document_mask=1", "document_mask = 1 has the wrong type; expected true or false"),
])
def test_keys_beyond_the_recipe_refuse_impossible_values_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(None, [*BASE, override])


def test_overrides_are_toml_values_or_bare_strings_and_reach_nested_tables():
    c = load_train_config(None, [*BASE, "lr=3e-4", "scan_layers=true", "mesh.tensor=2",
                                 "validation.zh=valid/zh", 'data=["a:2", "b:1"]', "output=runs/x y"])
    assert c.lr == 3e-4 and c.scan_layers is True and c.mesh == MeshConfig(1, -1, 2)
    assert c.validation == {"zh": "valid/zh"} and c.data == ("a:2", "b:1") and c.output == "runs/x y"
    assert isinstance(load_train_config(None, [*BASE, "lr=1"]).lr, float)


def test_overrides_apply_on_top_of_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('model = "m.json"\ndata = "d"\noutput = "o"\nsteps = 5\nbatch_size = 4\n[mesh]\nfsdp = 2\n')
    c = load_train_config(path, ["steps=7", "mesh.data=4"])
    assert (c.steps, c.data, c.mesh.fsdp, c.mesh.data) == (7, ("d",), 2, 4)


@pytest.mark.parametrize("override, message", [
    ("lrr=1", "unknown config key lrr; did you mean lr?"),
    ("mesh.fsdb=2", "unknown config key mesh.fsdb; did you mean mesh.fsdp?"),
    ("lr=fast", "lr = 'fast' has the wrong type; expected a number"),
    ("steps=1.5", "steps = 1.5 has the wrong type; expected an integer"),
    ("scan_layers=yes", "scan_layers = 'yes' has the wrong type; expected true or false"),
    ("lr=0", "lr = 0.0 is impossible; expected > 0"),
    ("min_lr_ratio=2", "min_lr_ratio = 2.0 is impossible; expected in [0, 1]"),
    ("adam_beta2=1", "adam_beta2 = 1.0 is impossible; expected in [0, 1)"),
    ("grad_accum=3", "batch_size 8 is not divisible by grad_accum 3"),
    ("dtype=fp16", "dtype = 'fp16'; expected one of bfloat16, float32"),
    ("mesh.fsdp=0", "mesh.fsdp must be a positive integer or -1"),
    ("mesh=3", "mesh = 3; expected a table"),
    ("steps", "override 'steps' is not key=value"),
])
def test_a_bad_key_or_value_is_one_error_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [*BASE, override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_keys_and_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="missing data, output"):
        load_train_config(None, ["model=m", "steps=1", "batch_size=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("steps = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_train_config(tmp_path / "bad.toml")


def test_a_mesh_must_use_every_device_exactly():
    assert MeshConfig(2, -1, 2).resolve(8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert MeshConfig(1, -1, 1).resolve(3) == {"data": 1, "fsdp": 3, "tensor": 1}
    with pytest.raises(ConfigError, match="leave some idle"):
        MeshConfig(3, -1, 1).resolve(8)  # 3 x 2 would leave two of eight devices idle
    with pytest.raises(ConfigError, match="spans 4 devices, but there are 8"):
        MeshConfig(2, 2, 1).resolve(8)
    with pytest.raises(ConfigError, match="at most one mesh axis may be -1"):
        MeshConfig(-1, -1, 1)


def _open(tmp_path, *overrides, data=None, trained=0):
    c = load_train_config(None, [*BASE, f"output={tmp_path / 'run'}", *overrides])
    return open_run(c, ModelConfig.from_hf(REPO_CONFIGS / "tiny.json"), data or {"tokenizer": "t"},
                    trained_steps=trained)


def test_a_rerun_resumes_and_may_change_how_steps_run(tmp_path):
    run = _open(tmp_path)
    assert (run / RUN_FILE).is_file()
    _open(tmp_path, "mesh.data=2", "remat=full", "log_every=1", "grad_accum=2", "loss_chunk=7")
    assert json.loads((run / RUN_FILE).read_text())["config"]["grad_accum"] == 2


def test_every_config_key_is_either_frozen_or_free_on_resume():
    keys = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(FROZEN_KEYS) | set(FREE_KEYS) == keys and not set(FROZEN_KEYS) & set(FREE_KEYS)


def test_raising_steps_must_say_what_the_schedule_does(tmp_path):
    run = _open(tmp_path, "steps=500000", "warmup_steps=2000")
    with pytest.raises(ConfigError, match=r"steps 500000 -> 1000000 would move the learning-rate "
                                          r"schedule's horizon from 500000 to 1000000.*"
                                          r"schedule_steps=500000 keeps.*schedule_steps=1000000 stretches"):
        _open(tmp_path, "steps=1000000", "warmup_steps=2000", trained=250000)
    assert json.loads((run / RUN_FILE).read_text())["config"]["steps"] == 500000  # not rewritten
    _open(tmp_path, "steps=1000000", "warmup_steps=2000", "schedule_steps=500000", trained=250000)
    # once kept, the horizon is part of the run: the same command resumes, a bare one is refused
    _open(tmp_path, "steps=1000000", "warmup_steps=2000", "schedule_steps=500000", trained=260000)
    with pytest.raises(ConfigError, match="from 500000 to 1000000"):
        _open(tmp_path, "steps=1000000", "warmup_steps=2000", trained=260000)


def test_steps_below_the_newest_checkpoint_is_refused(tmp_path):
    run = _open(tmp_path, "steps=300")
    with pytest.raises(ConfigError, match="steps = 100, but .* has trained 250 steps already"):
        _open(tmp_path, "steps=100", "schedule_steps=300", trained=250)
    assert json.loads((run / RUN_FILE).read_text())["config"]["steps"] == 300


def test_skip_data_may_gain_ranges_after_the_checkpoint_only(tmp_path):
    _open(tmp_path, "steps=3000")
    _open(tmp_path, "steps=3000", "skip_data=[[1150, 1250]]", trained=1000)
    with pytest.raises(ConfigError, match=r"skip_data drops \[\[1150, 1250\]\]"):
        _open(tmp_path, "steps=3000", trained=1000)
    # 1500 steps with batches 1150..1250 skipped have gone through batch 1601
    assert data_position(1500, ((1150, 1250),)) == 1601 and data_position(1149, ((1150, 1250),)) == 1149
    with pytest.raises(ConfigError, match=r"skip_data \[\[1600, 1700\]\] reaches batches .* at batch 1601"):
        _open(tmp_path, "steps=3000", "skip_data=[[1150, 1250], [1600, 1700]]", trained=1500)
    _open(tmp_path, "steps=3000", "skip_data=[[1150, 1250], [1602, 1700]]", trained=1500)


@pytest.mark.parametrize("ranges, problem", [
    ("[[5, 3]]", "is not \\[first, last\\]"), ("[[0, 3]]", "is not \\[first, last\\]"),
    ("[[1, 5], [5, 9]]", "overlap or are out of order"), ("[[1, 2, 3]]", "is not \\[first, last\\]"),
    ('["1-2"]', "wrong type; expected a list of \\[first, last\\] pairs")])
def test_bad_skip_data_is_refused(ranges, problem):
    with pytest.raises(ConfigError, match=problem):
        load_train_config(None, [*BASE, f"skip_data={ranges}"])


def test_a_rerun_with_another_model_data_or_batch_layout_is_refused(tmp_path):
    _open(tmp_path)
    with pytest.raises(ConfigError, match=r"another batch_size, seed \(batch_size: 8 -> 16; seed: 3407 -> 1\)"):
        _open(tmp_path, "batch_size=16", "seed=1")
    with pytest.raises(ConfigError, match="another data"):
        _open(tmp_path, data={"tokenizer": "other"})
    with pytest.raises(ConfigError, match="another model"):
        c = load_train_config(None, [*BASE, f"output={tmp_path / 'run'}"])
        open_run(c, ModelConfig.from_hf(REPO_CONFIGS / "tiny.json").replace(num_layers=3), {"tokenizer": "t"})


def test_a_rerun_that_turns_a_key_beyond_the_recipe_on_is_refused_and_older_runs_resume(tmp_path):
    run = _open(tmp_path)
    with pytest.raises(ConfigError, match=r"another z_loss, spike_skip \(z_loss: 0.0 -> 0.0001; spike_skip: False -> True\)"):
        _open(tmp_path, "z_loss=1e-4", "spike_skip=true")
    record = json.loads((run / RUN_FILE).read_text())
    for key in ("schedule", "z_loss", "document_mask", "spike_skip", "spike_window"):
        del record["config"][key]  # a run made before these keys existed
    (run / RUN_FILE).write_text(json.dumps(record))
    _open(tmp_path)


def test_a_directory_that_is_not_a_run_is_never_written_into(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a hammer run directory"):
        _open(tmp_path)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["notes.txt"]


def test_metrics_after_a_resume_hold_one_clean_curve(tmp_path):
    with MetricsLog(tmp_path, 0, tensorboard=False) as log:
        for step in range(1, 6):
            log.write({"step": step, "kind": "train", "loss": 10.0 - step})
    # Killed after step 5, resumed from the checkpoint of step 3: steps 4 and 5 are logged again.
    with MetricsLog(tmp_path, 3, tensorboard=True) as log:
        for step in range(4, 7):
            log.write({"step": step, "kind": "train", "loss": 1.0, "eval": {"zh": {"ppl": 2.0}}})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in read_metrics(tmp_path)][2:4] == [7.0, 1.0]
    assert any((tmp_path / "tensorboard").iterdir())


def test_mfu_uses_the_device_peak_table_or_an_override():
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("TPU v5 lite") == 197e12
    assert peak_flops("TPU v5p") == 459e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None and peak_flops("cpu", 1e12) == 1e12
    # HammerLLM-1.4B at the reference's 53.1k tokens/s on one H200.
    flops = ModelConfig.from_hf(REPO_CONFIGS / "hammerllm-1.4b.json").flops_per_token(2048)
    assert mfu(flops, 53.1e3, 1, peak_flops("H200")) == pytest.approx(0.441, abs=1e-3)
    assert mfu(flops, 1.0, 1, None) is None


def test_a_non_finite_loss_stops_the_run_naming_the_step():
    check_finite(3, loss=1.0, grad_norm=2.0)
    with pytest.raises(DivergedError, match="step 7: non-finite grad_norm = nan"):
        check_finite(7, loss=1.0, grad_norm=float("nan"))
