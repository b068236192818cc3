"""The train step computes the same losses and gradient norms on every mesh as on one device, and
4 accumulated micro-batches of 2 sequences equal one step of 8 (float32, 8 CPU devices)."""
import numpy as np
import pytest

from tests.train_fixtures import run_json_script

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 4, 2)]  # (data, fsdp, tensor)
# float32 reductions in another order: measured up to ~1e-6 relative on 3 steps
RTOL = 2e-5

SCRIPT = """
import json
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from hammer.config import ModelConfig
from hammer.train_config import TrainConfig
from hammer_jax.model import Llama
from hammer.schedule import from_config
from hammer_jax.optimizer import make_optimizer
from hammer_jax.sharding import MESH_AXES
from hammer_jax.train_step import batch_sharding, fresh_state, make_train_step
from tests.train_fixtures import MODEL

model_config = ModelConfig.from_hf(MODEL)
config = TrainConfig(model="m", data=("d",), output="o", steps=10, batch_size=8, lr=3e-3,
                     warmup_steps=1, dtype="float32")
rng = np.random.default_rng(0)
# One batch three times: random tokens hold nothing to learn across batches, but a batch seen
# again must score lower, so "it trains" can fail.
batches = [rng.integers(0, 259, (8, 32)).astype(np.int32)] * 3

def run(shape, grad_accum, devices):
    mesh = Mesh(np.array(devices).reshape(shape), MESH_AXES)
    make = lambda: Llama(model_config, rngs=nnx.Rngs(0))
    tx = make_optimizer(config)
    graphdef, shardings, state = fresh_state(make, tx, mesh)
    step = make_train_step(graphdef, tx, shardings, mesh, grad_accum=grad_accum, loss_chunk=16)
    out = []
    for k, batch in enumerate(batches):
        state, metrics = step(state, jax.device_put(batch, batch_sharding(mesh)), from_config(config)(k))
        out.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    return out

results = {"one device": run((1, 1, 1), 1, jax.devices()[:1]),
           "grad_accum 4 x 2": run((1, 1, 1), 4, jax.devices()[:1])}
for shape in %s:
    results[str(shape)] = run(shape, 1, jax.devices())
print(json.dumps(results))
""" % (MESHES,)


@pytest.mark.slow
def test_every_mesh_and_accumulation_gives_the_losses_and_grad_norms_of_one_device():
    results = run_json_script(SCRIPT, devices=8, timeout=900)
    reference = results.pop("one device")
    assert reference[2][0] < reference[0][0]  # it trains
    assert len(results) == len(MESHES) + 1
    for name, values in results.items():
        np.testing.assert_allclose(values, reference, rtol=RTOL, err_msg=name)
