"""The torch trainer: it trains as transformers would, DDP averages gradients through the loss
module, ZeRO-1 partitions the optimizer state, several processes train as one, a killed run resumes
exactly, an unreadable checkpoint falls back to the previous one; each rank saves its own shard in
the background, any number of ranks resumes it, and the ranks resume one step or none."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hammer.config import ConfigError  # noqa: E402
from hammer.metrics import read_metrics  # noqa: E402
from hammer.train_config import from_dict  # noqa: E402
from tests.train_fixtures import (REPO, run_train, start_train, train_env, wait_until,  # noqa: E402
                                  train_losses, train_settings, write_model_config,
                                  write_train_config)

SPACE = 32 + 3  # the byte tokenizer's id of " ": made the pad id, so the data holds it everywhere


def relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def inputs(train_inputs):
    return train_inputs


@pytest.fixture(scope="module")
def uninterrupted(inputs, tmp_path_factory):
    """A 6-step single-process run, checkpoints every 2 steps, evaluation every 3, steps 2..3
    profiled: the reference of the resume tests."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    config = write_train_config(tmp / "c.toml", inputs, tmp / "run", backend="torch", eval_every=3,
                                profile_steps=[2, 3])
    result = run_train(config)
    assert result.returncode == 0, result.stderr
    return config, tmp / "run"


def test_profile_steps_leave_a_chrome_trace_that_names_the_step(uninterrupted):
    _, run = uninterrupted
    trace = json.loads((run / "profile" / "trace.json").read_text())
    steps = [e for e in trace["traceEvents"] if e.get("name") == "hammer.train_step"]
    assert len(steps) == 2


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
import json
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


def run_torchrun(config, *overrides: str, ranks: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "hammer", "train", "--config", str(config), *overrides]
    return subprocess.run(command, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=600)


def resumed_from(stderr: str) -> int:
    """The step a run says it resumed from."""
    return int(re.search(r"resuming .* from step (\d+)", stderr).group(1))


@pytest.fixture(scope="module")
def two_ranks(uninterrupted, tmp_path_factory):
    """The uninterrupted run's config trained by 2 torchrun processes."""
    config, _ = uninterrupted
    run = tmp_path_factory.mktemp("two_ranks") / "run"
    result = run_torchrun(config, f"output={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_two_processes_under_torchrun_give_the_losses_of_one_with_the_same_global_batch(
        uninterrupted, two_ranks):
    """Also: each rank wrote the AdamW state of the parameters ZeRO-1 gave it, and no rank all of it."""
    import convert
    from torch.distributed.checkpoint import FileSystemReader

    _, single = uninterrupted
    one, two = train_losses(single), train_losses(two_ranks)
    assert one.keys() == two.keys() == set(range(1, 7))
    for step in one:
        assert abs(two[step] - one[step]) <= 1e-5 * abs(one[step]), step
    # Evaluation splits each validation batch across the ranks and sums back: the same numbers.
    evals = [[r for r in read_metrics(run) if r["kind"] == "eval"] for run in (single, two_ranks)]
    assert [r["step"] for r in evals[0]] == [r["step"] for r in evals[1]] == [3, 6]
    for a, b in zip(*([e["domains"]["valid"] for e in run_evals] for run_evals in evals)):
        assert a["tokens"] == b["tokens"] == 2 * 8 * 31  # eval_batches=2 of 8 blocks, 31 targets each
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * a["loss"]

    step = two_ranks / "checkpoints" / "step_6"
    written: dict[str, set[str]] = {}
    for index, stored in FileSystemReader(step / "optimizer").read_metadata().storage_data.items():
        if name := re.fullmatch(r"optimizer\.state\.(.+)\.exp_avg", index.fqn):
            written.setdefault(stored.relative_path, set()).add(name.group(1))
    assert sorted(written) == ["__0_0.distcp", "__1_0.distcp"]
    assert written["__0_0.distcp"].isdisjoint(written["__1_0.distcp"])
    assert written["__0_0.distcp"] | written["__1_0.distcp"] == set(convert.read_checkpoint(step)[1])


@pytest.mark.slow
def test_a_run_resumes_on_another_number_of_ranks_to_the_same_losses(uninterrupted, two_ranks, tmp_path):
    """2 ranks save and 1 resumes; 1 saves and 2 resume: each from step 2 of 6, every loss then
    within 1e-5 of the uninterrupted run's (AdamW's moments lost would move step 3's update)."""
    config, single = uninterrupted
    expected = train_losses(single)
    for name, source, command in (("to_one", two_ranks, run_train), ("to_two", single, run_torchrun)):
        run = tmp_path / name
        shutil.copytree(source, run)
        for step in (4, 6):
            shutil.rmtree(run / "checkpoints" / f"step_{step}")
        result = command(config, f"output={run}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert resumed_from(result.stderr) == 2, name
        losses = train_losses(run)
        assert losses.keys() == expected.keys(), name
        for step, loss in expected.items():
            assert abs(losses[step] - loss) <= 1e-5 * abs(loss), (name, step)


@pytest.mark.slow
def test_a_rank_that_cannot_read_the_checkpoint_rank_0_chose_stops_every_rank(uninterrupted, two_ranks,
                                                                              tmp_path):
    """Rank 1's shard of step 4 torn (a shared filesystem that shows it one rank late), step 6 gone:
    rank 0 reads step 4 and chooses it, and both ranks stop with the same error naming rank 1
    instead of rank 1 training on alone from step 2; nothing is trained or rewritten."""
    config, _ = uninterrupted
    run = tmp_path / "run"
    shutil.copytree(two_ranks, run)
    shutil.rmtree(run / "checkpoints" / "step_6")
    (run / "checkpoints" / "step_4" / "optimizer" / "__1_0.distcp").write_bytes(b"torn")
    metrics = (run / "metrics.jsonl").read_text()
    result = run_torchrun(config, f"output={run}")
    assert result.returncode != 0
    # one line from each rank (the two processes' writes to the one pipe may run together)
    errors = re.findall(r"hammer train: error: (reading \S*step_4, the checkpoint rank 0 chose, "
                        r"failed: rank 1 \([^;]*\); every rank stops)", result.stderr)
    assert len(errors) == 2 and errors[0] == errors[1], result.stderr[-3000:]
    assert result.stderr.count("hammer train: error:") == 2, result.stderr[-3000:]
    assert (run / "metrics.jsonl").read_text() == metrics
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_2", "step_4"]


@pytest.mark.slow
def test_sigterm_saves_and_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_losses(
        inputs, uninterrupted, tmp_path):
    """SIGTERM mid-run: exit 0 with a checkpoint of the step it stopped at. The same command then
    resumes; SIGKILL after its next checkpoint; the same command again resumes from that one (below
    the run's last step): every loss of the run equals the uninterrupted run's, bitwise."""
    config, reference = uninterrupted
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"

    log = tmp_path / "run.stderr"
    proc = start_train(config, f"output={run}", log=log)
    wait_until(proc, lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text(),
               log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    stopped = max(train_losses(run))
    assert stopped <= 3 and (checkpoints / f"step_{stopped}").is_dir()

    proc = start_train(config, f"output={run}", log=log)
    wait_until(proc, lambda: any(int(p.name[5:]) > stopped for p in checkpoints.glob("step_*")), log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    result = run_train(config, f"output={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert stopped < resumed_from(result.stderr) < 6
    assert train_losses(run) == train_losses(reference)
    kept = sorted({stopped, 2, 4, 6})[-3:]  # keep_checkpoints = 3 of the steps saved
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step_{s}" for s in kept]  # no temporaries


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
        (run / "checkpoints" / f"step_{step}" / "optimizer" / ".metadata").write_bytes(b"torn")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no checkpoint .* is readable"):
        train(cut)


def test_a_checkpoint_is_a_model_directory_beside_the_optimizer_shards_and_nothing_else(uninterrupted):
    """Each step_<N> holds what HF reads, the trainer's state and DCP's optimizer directory (one
    shard per rank); no RNG state, no temporaries; the run directory reads as its newest step."""
    import convert

    _, run = uninterrupted
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_2", "step_4", "step_6"]
    step = checkpoints / "step_6"
    assert sorted(p.name for p in step.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "optimizer", "trainer.json"]
    assert sorted(p.name for p in (step / "optimizer").iterdir()) == [".metadata", "__0_0.distcp"]
    _, newest = convert.read_checkpoint(run)
    _, saved = convert.read_checkpoint(step)
    assert newest.keys() == saved.keys() and all(np.array_equal(newest[k], saved[k]) for k in saved)


def test_a_save_is_a_snapshot_written_while_training_goes_on_and_restores_exactly(inputs, tmp_path):
    """`save` returns once weights and AdamW's moments are copied: changing them in place right
    after leaves the checkpoint as it was, and a fresh model and optimizer restore those values
    exactly."""
    from hammer.config import ModelConfig
    from hammer_torch import train_step
    from hammer_torch.model import Llama
    from hammer_torch.train_checkpoint import Checkpointer, TrainerState

    config = from_dict(train_settings(inputs, tmp_path / "run", backend="torch", validation={}))
    model_config = ModelConfig.from_hf(inputs.model)
    rows = torch.randint(3, 259, (config.batch_size, 33))

    def built():
        torch.manual_seed(0)
        step = train_step.build(config, Llama(model_config), torch.device("cpu"))
        return step, Checkpointer(tmp_path / "checkpoints", model_config, step.model, step.optimizer,
                                  keep=2)

    with train_step.process_group():
        step, checkpointer = built()
        for _ in range(3):
            step(rows, 1e-3)
        weights = {n: p.detach().clone() for n, p in step.model.named_parameters()}
        moments = {n: step.optimizer.optim.state[p]["exp_avg"].clone()
                   for n, p in step.model.named_parameters()}
        with checkpointer:
            slow_disk = threading.Event()  # rank 0's writer busy: the weights are written after the changes
            checkpointer.writer.submit(slow_disk.wait)
            checkpointer.save(TrainerState(3, {"seed": 1, "step": 3}))
            with torch.no_grad():
                for p in step.model.parameters():
                    p.add_(1.0)
                    step.optimizer.optim.state[p]["exp_avg"].add_(1.0)
            step(rows, 1e-3)
            slow_disk.set()

        again, restorer = built()
        with restorer:
            assert restorer.restore() == TrainerState(3, {"seed": 1, "step": 3})
        for name, p in again.model.named_parameters():
            assert torch.equal(p, weights[name]), name
            assert torch.equal(again.optimizer.optim.state[p]["exp_avg"], moments[name]), name


def test_tensor_parallel_mesh_is_refused_naming_the_key(inputs, tmp_path):
    from hammer_torch.train import train

    config = from_dict(train_settings(inputs, tmp_path / "run", backend="torch",
                                      mesh={"tensor": 2, "fsdp": 1}))
    with pytest.raises(ConfigError, match="mesh.tensor = 2"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_grad_accum_auto_without_a_cuda_device_is_refused(inputs, tmp_path):
    from hammer_torch.train import train

    config = from_dict(train_settings(inputs, tmp_path / "run", backend="torch", grad_accum="auto",
                                      memory_limit_gb=1.0))
    with pytest.raises(ConfigError, match="grad_accum = 'auto' on the torch backend .* CUDA"):
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
