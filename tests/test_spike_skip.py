"""Loss spikes (spike_skip = true): a step whose loss is a spike leaves the parameters and the
optimizer state as they were, on both backends, decided on the device; the next step equals that
of a run that never saw the spiking batch; a non-finite loss is skipped even before the window
fills; the window is saved with the state, so a resumed run skips what the uninterrupted one does.

The spike is injected as a scaled loss: the spiking step runs with z_loss = 1000, which multiplies
its objective by about 5000 (logsumexp^2 ~ 31 against a cross-entropy of 5.6) on the same batch.
With the stable phase of a WSD schedule and no warmup the learning rate is the same at every step,
so a run that skipped a step and one that never took it are comparable bitwise."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from hammer.config import ModelConfig  # noqa: E402
from hammer.spikes import is_spike  # noqa: E402
from hammer.train_config import TrainConfig  # noqa: E402
from tests.train_fixtures import MODEL  # noqa: E402

CONFIG = TrainConfig(model="m", data=("d",), output="o", steps=100, batch_size=4, lr=3e-3,
                     warmup_steps=0, schedule="wsd", decay_steps=1, dtype="float32",
                     spike_skip=True, spike_window=3)
SPIKE_Z_LOSS = 1000.0
BATCHES = [np.random.default_rng(i).integers(3, 259, (4, 32)).astype(np.int32) for i in range(5)]
SPIKE = 3  # the index of the batch that spikes


def test_the_rule_on_both_array_libraries():
    window = [5.0, 5.2, 4.8]  # mean 5, population std 0.163
    for xp, array in ((jnp, jnp.asarray), (torch, torch.tensor)):
        w = array(window)
        assert not bool(is_spike(array(5.9), w, array(3), 6.0, xp))  # 5.5 sigmas
        assert bool(is_spike(array(6.0), w, array(3), 6.0, xp))  # 6.1 sigmas
        assert not bool(is_spike(array(60.0), w, array(2), 6.0, xp))  # the window is not full yet
        assert bool(is_spike(array(float("nan")), w, array(0), 6.0, xp))  # non-finite: always
        assert bool(is_spike(array(float("inf")), w, array(3), 6.0, xp))


def _jax_run(batches, spike_at=None):
    """Params, opt state and metrics after a JAX step on each batch (the one at `spike_at` with the
    scaled loss), with the params and state just before and after that step."""
    from hammer_jax.model import Llama
    from hammer.schedule import from_config
    from hammer_jax.optimizer import make_optimizer
    from hammer_jax.sharding import MESH_AXES
    from hammer_jax.train_step import batch_sharding, fresh_state, make_train_step

    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)
    tx = make_optimizer(CONFIG)
    graphdef, shardings, state = fresh_state(
        lambda: Llama(ModelConfig.from_hf(MODEL), rngs=nnx.Rngs(0)), tx, mesh)
    steps = {z: make_train_step(graphdef, tx, shardings, mesh, grad_accum=1, loss_chunk=16, z_loss=z)
             for z in ((0.0, SPIKE_Z_LOSS) if spike_at is not None else (0.0,))}
    records, around = [], []
    for i, batch in enumerate(batches):
        if i == spike_at:
            around.append(jax.device_get((state.params, state.opt_state.inner)))
        state, metrics = steps[SPIKE_Z_LOSS if i == spike_at else 0.0](
            state, jax.device_put(batch, batch_sharding(mesh)), from_config(CONFIG)(i))
        records.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        if i == spike_at:
            around.append(jax.device_get((state.params, state.opt_state.inner)))
    return jax.device_get(state), records, around


def _equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def jax_runs():
    return _jax_run(BATCHES, spike_at=SPIKE), _jax_run(BATCHES[:SPIKE] + BATCHES[SPIKE + 1:])


@pytest.mark.slow
def test_jax_a_spike_changes_nothing_and_the_next_step_is_the_run_without_it(jax_runs):
    (state, records, (before, after)), (clean, clean_records, _) = jax_runs
    assert [r["skipped"] for r in records] == [0, 0, 0, 1, 1]
    assert records[SPIKE]["loss"] + records[SPIKE]["z_loss"] > 1000 * records[SPIKE - 1]["loss"]
    assert _equal(before, after)  # params and AdamW's state (its count included) untouched
    assert records[-1]["loss"] == clean_records[-1]["loss"]
    assert _equal(state.params, clean.params)
    assert _equal(state.opt_state.inner, clean.opt_state.inner)


def test_jax_a_non_finite_loss_is_skipped_before_the_window_fills():
    from hammer_jax.optimizer import skip_spikes

    tx = skip_spikes(optax.adam(0.1), sigmas=6.0, window=4)
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    updates, after = tx.update({"w": jnp.full(3, jnp.nan)}, state, params, loss=jnp.float32(jnp.nan))
    assert np.array_equal(updates["w"], np.zeros(3)) and _equal(after.inner, state.inner)
    assert (int(after.skipped), int(after.filled)) == (1, 0)
    updates, after = tx.update({"w": jnp.ones(3)}, after, params, loss=jnp.float32(2.5))
    assert np.abs(updates["w"]).min() > 0 and (int(after.filled), float(after.losses[0])) == (1, 2.5)


@pytest.mark.slow
def test_jax_the_window_is_checkpointed_with_the_state(tmp_path, jax_runs):
    """Saved and restored by the trainer's checkpoints: the restored state holds the same window,
    so the step after a resume skips (or not) as the uninterrupted run's does."""
    from hammer_jax.model import Llama
    from hammer_jax.optimizer import make_optimizer
    from hammer_jax.sharding import MESH_AXES
    from hammer_jax.train_checkpoint import TrainCheckpoints
    from hammer_jax.train_step import state_layout

    state = jax_runs[0][0]
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), MESH_AXES)
    _, _, abstract = state_layout(lambda: Llama(ModelConfig.from_hf(MODEL), rngs=nnx.Rngs(0)),
                                  make_optimizer(CONFIG), mesh)
    checkpoints = TrainCheckpoints(tmp_path, keep=1)
    checkpoints.save(jax.device_put(state), {"step": 5})
    checkpoints.wait()
    restored, _ = checkpoints.restore(abstract)
    checkpoints.close()
    window = restored.opt_state
    assert (int(window.filled), int(window.skipped)) == (4, 1)
    assert np.array_equal(window.losses, state.opt_state.losses) and window.losses.min() > 5


def _torch_run(batches, spike_at=None):
    from hammer.schedule import from_config
    from hammer_torch import train_step
    from hammer_torch.model import Llama

    with train_step.process_group() as device:
        torch.manual_seed(0)
        step_fn = train_step.build(CONFIG, Llama(ModelConfig.from_hf(MODEL)), device)
        records, around = [], []
        snapshot = lambda: ({n: p.detach().clone() for n, p in step_fn.model.named_parameters()},
                            {k: {n: v.clone() for n, v in s.items()}
                             for k, s in enumerate(step_fn.optimizer.optim.state.values())})
        for i, batch in enumerate(batches):
            step_fn.loss_module.z_loss = SPIKE_Z_LOSS if i == spike_at else 0.0
            if i == spike_at:
                around.append(snapshot())
            loss, _, metrics = step_fn(train_step.step_rows(batch, device, None), from_config(CONFIG)(i))
            records.append({"loss": float(loss), **{k: float(v) for k, v in metrics.items()}})
            if i == spike_at:
                around.append(snapshot())
        return snapshot(), records, around, step_fn.spikes.to_dict()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        _same(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) for k in a)


def test_torch_a_spike_changes_nothing_and_the_next_step_is_the_run_without_it():
    (params, adam), records, (before, after), window = _torch_run(BATCHES, spike_at=SPIKE)
    (clean_params, clean_adam), clean_records, _, _ = _torch_run(BATCHES[:SPIKE] + BATCHES[SPIKE + 1:])
    assert [r["skipped"] for r in records] == [0, 0, 0, 1, 1]
    assert _same(before[0], after[0]) and _same(before[1], after[1])  # AdamW's step count included
    assert records[-1]["loss"] == clean_records[-1]["loss"]
    assert _same(params, clean_params) and _same(adam, clean_adam)
    assert (window["filled"], window["skipped"]) == (4, 1)


def test_torch_the_window_goes_through_the_trainer_state(tmp_path):
    from hammer_torch import train_checkpoint, train_step
    from hammer_torch.model import Llama

    with train_step.process_group() as device:
        torch.manual_seed(0)
        step_fn = train_step.build(CONFIG, Llama(ModelConfig.from_hf(MODEL)), device)
        for batch in BATCHES[:2]:
            step_fn(train_step.step_rows(batch, device, None), CONFIG.lr)
        saved = step_fn.spikes.to_dict()
        model_config = ModelConfig.from_hf(MODEL)
        with train_checkpoint.Checkpointer(tmp_path, model_config, step_fn.model, step_fn.optimizer,
                                           keep=1) as checkpointer:
            checkpointer.save(train_checkpoint.TrainerState(2, {"seed": 0, "step": 2}, saved))
        fresh = train_step.build(CONFIG, Llama(model_config), device)
        with train_checkpoint.Checkpointer(tmp_path, model_config, fresh.model, fresh.optimizer,
                                           keep=1) as checkpointer:
            resumed = checkpointer.restore()
        fresh.spikes.load(resumed.spikes)
        assert fresh.spikes.to_dict() == saved and saved["filled"] == 2 and min(saved["losses"][:2]) > 5
        assert torch.equal(fresh.spikes.losses, step_fn.spikes.losses)
