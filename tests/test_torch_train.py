"""The torch trainer: it trains as transformers would, DDP averages gradients through the loss
module, ZeRO-1 partitions the optimizer state, several processes train as one, a killed run resumes
exactly, an unreadable checkpoint falls back to the previous one."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hammer.config import ConfigError  # noqa: E402
from hammer.metrics import read_metrics  # noqa: E402
from hammer.train_config import from_dict  # noqa: E402
from tests.train_fixtures import (REPO, run_train, start_train, tiny_inputs, train_env,  # noqa: E402
                                  train_losses, train_settings, write_model_config,
                                  write_train_config)

SPACE = 32 + 3  # the byte tokenizer's id of " ": made the pad id, so the data holds it everywhere


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return tiny_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    """A 6-step single-process run, checkpoints every 2 steps, evaluation every 3: the reference of
    the resume tests."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = write_train_config(tmp / "c.toml", inputs, tmp / "run", backend="torch", eval_every=3)
    result = run_train(config)
    assert result.returncode == 0, result.stderr
    return config, tmp / "run"


@pytest.mark.slow
def test_the_twin_trains_as_transformers_would(inputs, tmp_path):
    """3 steps of the trainer = 3 steps of LlamaForCausalLM + torch.optim.AdamW (HF Trainer's decay
    groups) + the schedule under LambdaLR + clip_grad_norm_, float32: every tensor within 1e-6
    (measured: bitwise equal on CPU), the pad row (which the data holds) untouched."""
    import transformers
    import convert
    from hammer import schedule
    from hammer.data.loader import Loader, mixture_from_specs
    from hammer_torch.train import train

    model_json = write_model_config(tmp_path / "model.json", pad_token_id=SPACE)
    hf_config = transformers.LlamaConfig.from_json_file(model_json)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(hf_config).float()
    reference.save_pretrained(tmp_path / "init")
    initial_rows = reference.model.embed_tokens.weight[SPACE:SPACE + 2].detach().clone().numpy()

    settings = train_settings(inputs, tmp_path / "run", backend="torch", model=str(model_json),
                              init=str(tmp_path / "init"), steps=3, warmup_steps=1, batch_size=4,
                              grad_accum=2, lr=1e-2, weight_decay=0.1, max_grad_norm=0.5,
                              checkpoint_every=3, validation={})
    config = from_dict(settings)
    train(config)

    decay = [p for n, p in reference.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in reference.named_parameters() if "norm" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    lr_at = schedule.from_config(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_at(k) / config.lr)
    loader = Loader(mixture_from_specs(config.data), config.batch_size, seed=config.seed)
    grad_norms = []
    for _ in range(config.steps):
        batch = torch.from_numpy(next(loader).astype(np.int64))
        assert (batch == SPACE).any()
        for ids in batch.chunk(config.grad_accum):
            (reference(input_ids=ids, labels=ids).loss / config.grad_accum).backward()
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert max(grad_norms) > 0.5  # clipping acted

    _, trained = convert.read_checkpoint(tmp_path / "run" / "checkpoints" / "step_3")
    expected = {n: p.detach().numpy() for n, p in reference.state_dict().items()}
    assert trained.keys() == expected.keys()
    for name, value in expected.items():
        assert relative(trained[name], value) <= 1e-6, name
    pad_row, next_row = trained["model.embed_tokens.weight"][SPACE:SPACE + 2]
    assert np.array_equal(pad_row, initial_rows[0]) and not np.array_equal(next_row, initial_rows[1])


def test_random_init_zeroes_the_pad_row_and_the_lookup_never_updates_it():
    from hammer.config import ModelConfig
    from hammer_torch.loss import causal_lm_loss
    from hammer_torch.model import Llama

    from tests.train_fixtures import MODEL
    config = ModelConfig.from_hf({**MODEL, "pad_token_id": SPACE})
    model = Llama(config)
    embed = model.model.embed_tokens.weight
    assert embed[SPACE].abs().max() == 0 and embed[SPACE + 1].abs().max() > 0
    ids = torch.full((2, 9), SPACE)
    ids[:, ::2] = 7
    causal_lm_loss(model, ids).backward()
    assert embed.grad[SPACE].abs().max() == 0 and embed.grad[7].abs().max() > 0


_DDP_WORKER = """
import sys, torch, torch.distributed as dist
from hammer.config import ModelConfig
from hammer.train_config import from_dict
from hammer_torch.loss import CausalLMLoss
from hammer_torch.model import Llama
from hammer_torch.train_step import _optimizer
from tests.train_fixtures import MODEL

rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
torch.manual_seed(0)
model = Llama(ModelConfig.from_hf(MODEL))
ddp = torch.nn.parallel.DistributedDataParallel(CausalLMLoss(model, chunk_size=16))
ids = torch.randint(3, 259, (2, 2, 17))  # the same draws on both ranks; each takes its own rows
ddp(ids[rank])[0].backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters()])
alone = []
for r in range(2):  # what each rank's rows alone give, computed without DDP
    model.zero_grad()
    CausalLMLoss(model, 16)(ids[r])[0].backward()
    alone.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
mean = (alone[0] + alone[1]) / 2
assert (grads - mean).norm() <= 1e-6 * mean.norm(), "DDP did not average the gradients"
assert (alone[0] - alone[1]).norm() > 1e-3 * mean.norm()

config = from_dict({"model": "m", "data": ["d"], "output": "o", "steps": 1, "batch_size": 2})
for p, g in zip(model.parameters(), grads.split([p.numel() for p in model.parameters()])):
    p.grad = g.view_as(p).clone()
optimizer = _optimizer(model, config, torch.device("cpu"))
optimizer.step()
held = {id(p) for group in optimizer.optim.param_groups for p in group["params"]}
state = {id(p) for p in optimizer.optim.state}
mine = sum(p.numel() for p in model.parameters() if id(p) in held)
total = sum(p.numel() for p in model.parameters())
assert state == held and 0 < mine < total, (mine, total)
sizes = [None, None]
dist.all_gather_object(sizes, mine)
assert sum(sizes) == total, (sizes, total)
dist.destroy_process_group()
print("ok", rank, mine, total)
"""


@pytest.mark.slow
def test_ddp_averages_the_gradients_of_the_loss_module_and_zero1_splits_the_optimizer_state(tmp_path):
    """Two gloo ranks: gradients through CausalLMLoss are the mean of the ranks' own (a loss computed
    on ddp.module would leave each rank its own), and each rank holds AdamW state for its part only."""
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-c", _DDP_WORKER, str(rank), str(store)], cwd=REPO,
                              env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert out.startswith("ok")


@pytest.mark.slow
def test_two_processes_under_torchrun_give_the_losses_of_one_with_the_same_global_batch(
        inputs, uninterrupted, tmp_path):
    config, single = uninterrupted
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "hammer", "train", "--config", str(config), f"output={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = train_losses(single), train_losses(tmp_path / "run")
    assert one.keys() == two.keys() == set(range(1, 7))
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), step
    # Evaluation splits each validation batch across the ranks and sums back: the same numbers.
    evals = [[r for r in read_metrics(run) if r["kind"] == "eval"] for run in (single, tmp_path / "run")]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [3, 6]
    for a, b in zip(*([e["domains"]["valid"] for e in run_evals] for run_evals in evals)):
        assert a["tokens"] == b["tokens"] == 2 * 8 * 31  # eval_batches=2 of 8 blocks, 31 targets each
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"]


@pytest.mark.slow
def test_sigterm_saves_and_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_losses(
        inputs, uninterrupted, tmp_path):
    """SIGTERM mid-run: exit 0 with a checkpoint of the step it stopped at. The same command then
    resumes; SIGKILL after its next checkpoint; the same command again: every loss of the run equals
    the uninterrupted run's, bitwise."""
    config, reference = uninterrupted
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"

    proc = start_train(config, f"output={run}", stderr=subprocess.DEVNULL)
    _wait_for(proc, lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0
    stopped = max(train_losses(run))
    assert stopped <= 3 and (checkpoints / f"step_{stopped}").is_dir()

    proc = start_train(config, f"output={run}", stderr=subprocess.DEVNULL)
    _wait_for(proc, lambda: any(int(p.name[5:]) > stopped for p in checkpoints.glob("step_*")))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run_train(config, f"output={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming" in result.stderr
    assert train_losses(run) == train_losses(reference)


def _wait_for(proc, condition, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the awaited moment"
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_with_a_warning(
        uninterrupted, tmp_path):
    from hammer.train_config import load_train_config
    from hammer_torch.train import train
    from hammer_torch.train_checkpoint import CheckpointError

    config, reference = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "checkpoints" / "step_6" / "model.safetensors").write_bytes(b"torn")
    cut = load_train_config(config, [f"output={run}"])
    with pytest.warns(UserWarning, match=r"checkpoint .*step_6 is unreadable"):
        train(cut)
    assert train_losses(run) == train_losses(reference)  # steps 5 and 6 trained again, identically
    for step in (2, 4, 6):
        (run / "checkpoints" / f"step_{step}" / "optimizer.pt").write_bytes(b"torn")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no checkpoint .* is readable"):
        train(cut)


def test_tensor_parallel_mesh_is_refused_naming_the_key(inputs, tmp_path):
    from hammer_torch.train import train

    config = from_dict(train_settings(inputs, tmp_path / "run", backend="torch",
                                      mesh={"tensor": 2, "fsdp": 1}))
    with pytest.raises(ConfigError, match="mesh.tensor = 2"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_auto_attention_checks_the_gpu_generation_and_warns_when_it_falls_back_to_eager(monkeypatch):
    from hammer_torch import attention

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "sm80+" in attention.unavailable_reason("sdpa", cuda, torch.bfloat16, 64)
    with pytest.warns(UserWarning, match="falls back to eager on a GPU .*sm75"):
        assert attention.resolve("auto", cuda, torch.bfloat16, 64) == "eager"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert attention.unavailable_reason("sdpa", cuda, torch.bfloat16, 128) is None
    assert "multiple of 8 up to 256" in attention.unavailable_reason("sdpa", cuda, torch.bfloat16, 320)


def test_full_remat_recomputes_the_blocks_and_changes_no_loss(inputs, tmp_path):
    """remat = full wraps each block in activation checkpointing; the checkpoint's names stay HF's."""
    import convert
    from hammer_torch.train import train

    losses, weights = {}, {}
    for remat in ("none", "full"):
        run = tmp_path / remat
        train(from_dict(train_settings(inputs, run, backend="torch", remat=remat, steps=2,
                                       validation={})))
        losses[remat] = train_losses(run)
        weights[remat] = convert.read_checkpoint(run / "checkpoints" / "step_2")[1]
    assert losses["full"] == pytest.approx(losses["none"], rel=1e-6)
    for name, value in weights["none"].items():
        assert relative(weights["full"][name], value) <= 1e-6, name


def test_an_init_of_another_model_is_refused_naming_what_differs(inputs, tmp_path):
    from hammer.config import ModelConfig
    from hammer_torch import Llama, save_pretrained
    from hammer_torch.train import train

    other = ModelConfig.from_hf(write_model_config(tmp_path / "other.json", intermediate_size=80))
    save_pretrained(Llama(other), tmp_path / "init")
    config = from_dict(train_settings(inputs, tmp_path / "run", backend="torch", init=str(tmp_path / "init")))
    with pytest.raises(ConfigError, match="intermediate_size 80 there, 96 here"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_saves_nothing_after_it(inputs, tmp_path):
    from hammer.metrics import DivergedError
    from hammer_torch.train import train

    config = from_dict(train_settings(inputs, tmp_path / "run", backend="torch", lr=1e30,
                                      warmup_steps=0, checkpoint_every=1, validation={}))
    with pytest.raises(DivergedError, match=r"step (\d+): non-finite") as error:
        train(config)
    diverged = int(error.value.args[0].split()[1].rstrip(":"))
    saved = sorted(int(p.name[5:]) for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert diverged >= 2 and saved == list(range(1, diverged))
