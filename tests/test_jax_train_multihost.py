"""`hammer train` over two JAX processes on localhost (jax.distributed, 4 CPU devices each, gloo
collectives): the losses of one process with 8 devices, a checkpoint another topology resumes,
every batch row where the mesh puts it, and a dead process taking the run down."""
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from hammer.config import ConfigError, ModelConfig
from hammer.data.loader import mixture_from_specs
from hammer.run import data_fingerprint, open_run
from hammer.train_config import DistributedConfig, load_train_config
from hammer_jax.distributed import detected_cluster, join
from tests.train_fixtures import (REPO, train_command, train_env, train_losses,
                                  write_model_config, write_train_config)

# float32 on both sides; the two topologies reduce in another order (gloo across processes):
# measured up to ~3e-7 relative over 4 steps
RTOL = 1e-5


BASE = ["model=m.json", "data=d", "output=o", "steps=3", "batch_size=8"]


def test_the_distributed_table_is_checked_where_it_enters():
    c = load_train_config(None, [*BASE, "distributed.coordinator_address=10.0.0.1:1234",
                                 "distributed.num_processes=4", "distributed.process_id=3",
                                 "distributed.local_device_ids=[0, 1]", "distributed.heartbeat_timeout=20"])
    assert c.distributed == DistributedConfig("auto", "10.0.0.1:1234", 4, 3, (0, 1), 300, 20)
    bad = {"distributed.heartbeat=5": "unknown config key distributed.heartbeat; did you mean "
                                      r"distributed.heartbeat_timeout\?",
           "distributed.mode=maybe": "distributed.mode = 'maybe'; expected one of auto, on, off",
           "distributed.process_id=2": r"process_id = 2 is not in \[0, num_processes = 2\)",
           "distributed.local_device_ids=[-1]": r"local_device_ids = \[-1\]",
           "distributed.heartbeat_timeout=0": "heartbeat_timeout = 0 is impossible",
           "distributed.num_processes=two": "distributed.num_processes = 'two' has the wrong type"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_train_config(None, [*BASE, "distributed.num_processes=2", override])


def test_a_run_may_resume_on_another_number_of_processes(tmp_path):
    model = ModelConfig.from_hf(write_model_config(tmp_path / "m.json"))
    run = [*BASE, f"output={tmp_path / 'run'}"]
    open_run(load_train_config(None, run), model, {"tokenizer": "t"})
    moved = load_train_config(None, [*run, "distributed.coordinator_address=h:1", "distributed.num_processes=4"])
    assert open_run(moved, model, {"tokenizer": "t"}) == tmp_path / "run"


def test_auto_joins_a_cluster_jax_detects_with_more_than_one_process():
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert detected_cluster({**slurm, "SLURM_NTASKS": "2"}) == "slurm"
    assert detected_cluster({**slurm, "SLURM_NTASKS": "1"}) is None  # a one-task job step
    assert detected_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) is None  # sbatch, not srun
    assert detected_cluster({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:5", "OMPI_COMM_WORLD_SIZE": "4"}) == "ompi"
    assert not join(DistributedConfig(mode="off"), {**slurm, "SLURM_NTASKS": "2"})  # off: never
    if importlib.util.find_spec("libtpu") is None:  # not a TPU VM: auto outside a cluster is one process
        assert detected_cluster({}) is None
        assert not join(DistributedConfig(), {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_pair(config, *overrides, heartbeat: int = 60, env=None) -> list[subprocess.Popen]:
    """`hammer train` as processes 0 and 1 of a two-process run with 4 CPU devices each, the
    launch recipe README.md gives for one machine."""
    port = free_port()
    procs = []
    for pid in (0, 1):
        command = train_command(config, *overrides, f"distributed.coordinator_address=localhost:{port}",
                                "distributed.num_processes=2", f"distributed.process_id={pid}",
                                f"distributed.heartbeat_timeout={heartbeat}")
        procs.append(subprocess.Popen(command, env=env or train_env(4), cwd=REPO, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs, timeout: float = 600) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        out.append((proc.returncode, stderr))
    return out


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_train_as_one_and_their_checkpoint_resumes_on_one(tmp_path, train_inputs):
    inputs = train_inputs
    # one schedule over 4 steps: a 3-step run raised to 4 steps continues exactly as a 4-step run
    settings = dict(mesh={"data": 2, "fsdp": 4}, schedule_steps=4, checkpoint_every=3)
    one = write_train_config(tmp_path / "one.toml", inputs, tmp_path / "one", steps=4, **settings)
    two = write_train_config(tmp_path / "two.toml", inputs, tmp_path / "two", steps=3, **settings)

    pair = start_pair(two)
    reference = subprocess.run(train_command(one), env=train_env(8), cwd=REPO, capture_output=True,
                               text=True, timeout=600)
    results = finish(pair)
    assert reference.returncode == 0, reference.stderr[-3000:]
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    expected = {r["step"]: (r["loss"], r["grad_norm"]) for r in records(tmp_path / "one")}
    got = [(r["step"], r["loss"], r["grad_norm"]) for r in records(tmp_path / "two")]
    assert [step for step, *_ in got] == [1, 2, 3]  # process 0 alone wrote the metrics
    np.testing.assert_allclose([values for _, *values in got], [expected[s] for s in (1, 2, 3)],
                               rtol=RTOL)
    assert expected[3][0] < expected[1][0]  # it trains
    assert "resuming" not in results[1][1]  # process 1 prints no messages (nor a progress bar)

    # One process with 8 devices, and another mesh, continues the two-process run.
    resumed = subprocess.run(train_command(two, "steps=4", "mesh.data=1", "mesh.fsdp=8"),
                             env=train_env(8), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 3" in resumed.stderr
    losses = train_losses(tmp_path / "two")
    np.testing.assert_allclose(losses[4], expected[4][0], rtol=RTOL)


ROWS_SCRIPT = """
import sys
import jax
import numpy as np
from jax.sharding import Mesh
from hammer.data.loader import Loader, mixture_from_specs
from hammer.train_config import DistributedConfig
from hammer_jax.distributed import BatchPlacer, join
from hammer_jax.sharding import MESH_AXES

join(DistributedConfig(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])))
devices = np.array(jax.devices())  # process 0 holds the first four
mixture = mixture_from_specs([sys.argv[3]])
whole = Loader(mixture, 8, seed=5).batch(2)  # the global batch as one process reads it
meshes = {  # (data, fsdp, tensor) over devices in this order
    "data across processes": ((2, 4, 1), [0, 1, 2, 3, 4, 5, 6, 7]),
    "fsdp across processes": ((2, 4, 1), [0, 1, 4, 5, 2, 3, 6, 7]),
    "fsdp spans all": ((1, 8, 1), [0, 4, 1, 5, 2, 6, 3, 7]),
    "tensor across processes": ((2, 2, 2), [0, 4, 1, 5, 2, 6, 3, 7]),
}
for name, (shape, order) in meshes.items():
    place = BatchPlacer(Mesh(devices[order].reshape(shape), MESH_AXES), 8, mixture.block_size)
    loader = Loader(mixture, 8, seed=5, rows=place.rows)
    batch = place(loader.batch(2))
    for shard in batch.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), whole[shard.index], err_msg=name)
    contiguous = place.rows.tolist() == list(range(4 * jax.process_index(), 4 * jax.process_index() + 4))
    print(f"ROWS {jax.process_index()} {name}: {place.rows.tolist()} contiguous={contiguous}", flush=True)
"""


@pytest.mark.slow
def test_every_batch_row_lands_where_the_mesh_puts_it_whichever_axes_span_the_processes(tmp_path, train_inputs):
    inputs = train_inputs
    address = f"localhost:{free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", ROWS_SCRIPT, address, str(pid), str(inputs.data)],
                              env=train_env(4), cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for pid in (0, 1)]
    outputs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        outputs.append([line for line in stdout.splitlines() if line.startswith("ROWS")])
    lines = "\n".join(outputs[0] + outputs[1])
    assert len(outputs[0]) == len(outputs[1]) == 4, lines
    # the meshes this checks are not only the loader's plain contiguous split
    assert "0 fsdp across processes: [0, 1, 4, 5] contiguous=False" in lines
    assert "1 fsdp across processes: [2, 3, 6, 7] contiguous=False" in lines
    assert "1 tensor across processes: [0, 1, 2, 3, 4, 5, 6, 7] contiguous=False" in lines


@pytest.mark.slow
def test_a_dead_process_takes_the_run_down_instead_of_hanging(tmp_path, train_inputs):
    inputs = train_inputs
    config = write_train_config(tmp_path / "c.toml", inputs, tmp_path / "run", steps=100000,
                                checkpoint_every=100000, mesh={"data": 2, "fsdp": 4})
    heartbeat = 5
    survivor, victim = start_pair(config, heartbeat=heartbeat)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "run" / "metrics.jsonl").is_file() or not records(tmp_path / "run"):
            assert survivor.poll() is None and victim.poll() is None, finish([survivor, victim])
            assert time.monotonic() < deadline, "the run never trained a step"
            time.sleep(0.5)
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code, stderr = finish([survivor], timeout=heartbeat * 12)[0]
        waited = time.monotonic() - killed
    finally:
        for proc in (survivor, victim):
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert code != 0, stderr[-3000:]
    assert waited < heartbeat * 12, f"process 0 hung {waited:.0f} s after process 1 died"
    print(f"process 0 exited {code} {waited:.1f} s after process 1 was killed")


@pytest.mark.slow
def test_a_run_refused_is_refused_by_every_process_with_one_line(tmp_path, train_inputs):
    inputs = train_inputs
    config = write_train_config(tmp_path / "c.toml", inputs, tmp_path / "run", mesh={"data": 2, "fsdp": 4})
    settings = load_train_config(config, ["lr=1e-3"])
    open_run(settings, settings.model_config(), data_fingerprint(mixture_from_specs(settings.data)))
    for code, stderr in finish(start_pair(config), timeout=300):  # lr 3e-3 now: another run
        assert code == 2, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith("hammer train: error: ")
        assert "another lr (lr: 0.001 -> 0.003)" in stderr
