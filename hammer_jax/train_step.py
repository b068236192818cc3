"""The jitted training step over plain pytrees, and the evaluation step beside it.

The state is float32 master params (the nested dict `convert` reads), the optax state and the step
count; the model's structure (`graphdef`, which carries the compute dtype, remat policy and
attention kernel) stays outside and is merged with the params inside the loss. One optimizer step
takes the global batch [batch_size, seq], splits it into `grad_accum` micro-batches and scans
over them, summing float32 gradients, so the loss and the update are those of the whole batch
whatever the split. Micro-batch a holds rows a, a + A, a + 2A..., so that each device's rows stay
on it. The state is donated: the update is written over the old state.

The objective is the mean cross-entropy plus, with `z_loss`, the z-loss term; both are reported
apart. With document masking the batch carries each row's segment ids and positions beside its
ids. The optimizer (`hammer_jax.optimizer`) is handed the objective, which spike skipping reads;
the learning rate comes with each call, the schedule's at that step (hammer.train_loop).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hammer.data.loader import documents
from hammer_jax.loss import loss_sums
from hammer_jax.optimizer import SkipSpikesState

BATCH_AXES = ("data", "fsdp")  # the batch is split over both data-parallel mesh axes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # nested dict of float32 arrays, hammer_jax's param layout
    opt_state: Any


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES, None))


def batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def state_shardings(param_shardings, tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Each optimizer moment sharded as its parameter; counts and other scalars replicated."""
    replicated = NamedSharding(mesh, P())
    abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct((), jnp.float32), param_shardings)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, param_shardings,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=param_shardings, opt_state=opt)


def init_state(params, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """The state of a fresh run from (already placed) params."""
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(step=step, params=params, opt_state=opt_state)


def state_layout(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                 mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, state shardings, abstract state) of `make_model()` on `mesh` with the optimizer
    state of `tx`, nothing allocated. The abstract state holds each leaf's shape, dtype and
    sharding: the target a checkpoint restores into."""
    from hammer_jax.sharding import model_shardings

    abstract_model = nnx.eval_shape(make_model)
    graphdef, abstract_params = nnx.split(abstract_model)
    params = nnx.to_pure_dict(abstract_params)
    shardings = state_shardings(nnx.to_pure_dict(model_shardings(abstract_model, mesh)), tx, mesh)
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=jax.eval_shape(tx.init, params))
    abstract = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                            shapes, shardings)
    return graphdef, shardings, abstract


def random_params(make_model: Callable[[], nnx.Module], param_shardings) -> Any:
    """`make_model()`'s freshly initialized params, made directly in their shards."""
    return jax.jit(lambda: nnx.to_pure_dict(nnx.state(make_model())), out_shardings=param_shardings)()


def fresh_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                mesh: Mesh) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """(graphdef, state shardings, state) of `make_model()` initialized directly in its shards on
    `mesh`, with the optimizer state of `tx`: what a run that starts from scratch holds."""
    graphdef, shardings, _ = state_layout(make_model, tx, mesh)
    return graphdef, shardings, init_state(random_params(make_model, shardings.params), tx, shardings)


def _under(mesh: Mesh) -> Callable:
    """Traces a step with `mesh` in context, so that every kernel XLA cannot partition (splash,
    cuDNN) runs per device shard (`hammer_jax.per_shard`) whoever calls or lowers the step."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def traced(*args):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
                return fn(*args)
        return traced
    return wrap


def place_batch(rows: np.ndarray, place: Callable, bos_id: int | None):
    """The step's batch from this process's `rows` of token ids: `place(rows)`, or with document
    masking (`bos_id` set) the placed (ids, segment ids, positions)."""
    if bos_id is None:
        return place(rows)
    return tuple(place(x) for x in (rows, *documents(rows, bos_id)))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformationExtraArgs,
                    shardings: TrainState, mesh: Mesh, *, grad_accum: int, loss_chunk: int,
                    z_loss: float = 0.0) -> Callable:
    """jit(state, batch, lr) -> (state, metrics); donates the state. `batch` is the token ids
    [B, S] int32, or with document masking the tuple (ids, segment ids, positions), each [B, S]
    (`hammer.data.loader.documents`). `tx` (`hammer_jax.optimizer.make_optimizer`) updates at a
    learning rate of 1; the step scales by `lr`, a runtime float32 scalar, so the compiled step
    does not depend on the schedule.

    metrics: "loss" (the cross-entropy), "grad_norm" (before clipping); with z_loss > 0 also
    "z_loss" (its term in the objective, z_loss * mean(logsumexp^2)); with spike skipping also
    "skipped" (steps skipped so far, this one included)."""
    shards = batch_shards(mesh)
    micro_sharding = NamedSharding(mesh, P(None, BATCH_AXES, None))

    def loss_fn(params, micro, tokens):
        ids, *documents = micro
        nll, z, _ = loss_sums(nnx.merge(graphdef, params), ids, loss_chunk, shards, *documents)
        objective = nll + z_loss * z if z_loss else nll
        return objective / tokens, jnp.stack([nll, z_loss * z]) / tokens

    @_under(mesh)
    def step(state: TrainState, batch, lr):
        batch = batch if isinstance(batch, tuple) else (batch,)
        rows, seq = batch[0].shape
        tokens = rows * (seq - 1)  # every position of every block but its last predicts one

        def split(x):
            micro = x.reshape(rows // grad_accum, grad_accum, seq).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(micro, micro_sharding)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(carry, micro):
            terms, grads = carry
            (_, micro_terms), micro_grads = grad_fn(state.params, micro, tokens)
            grads = jax.tree.map(jnp.add, grads, micro_grads)
            return (terms + micro_terms, jax.lax.with_sharding_constraint(grads, shardings.params)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (terms, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((2,), jnp.float32), zeros),
                                         tuple(map(split, batch)))
        updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                       loss=terms[0] + terms[1])
        params = optax.apply_updates(state.params, optax.tree.scale(lr, updates))
        metrics = {"loss": terms[0], "grad_norm": optax.tree.norm(grads)}
        if z_loss:
            metrics["z_loss"] = terms[1]
        if isinstance(opt_state, SkipSpikesState):
            metrics["skipped"] = opt_state.skipped
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(shardings, batch_sharding(mesh), replicated),
                   out_shardings=(shardings, replicated), donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, param_shardings, mesh: Mesh, *, loss_chunk: int
                   ) -> Callable:
    """jit(params, batch) -> the float32 sum of the batch's next-token NLL; `batch` as the train
    step's (ids [B, S], or with document masking (ids, segment ids, positions))."""
    shards = batch_shards(mesh)

    @_under(mesh)
    def evaluate(params, batch):
        ids, *documents = batch if isinstance(batch, tuple) else (batch,)
        return loss_sums(nnx.merge(graphdef, params), ids, loss_chunk, shards, *documents)[0]

    return jax.jit(evaluate, in_shardings=(param_shardings, batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, P()))
