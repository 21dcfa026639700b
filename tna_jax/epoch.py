"""The compiled training program of every run: the stacked state, its initialisation, and one
jitted call that trains every run for a chunk of an epoch's steps.

All runs of an experiment are stacked on a leading axis of every array (params, BatchNorm
statistics, optimizer state, keys). ``jax.vmap`` (or, for convolutions on CPU, a loop over runs
in the program: `tna_jax.run_axis`) maps the per-run step over that axis, and ``jax.lax.scan``
runs the steps of a chunk inside one dispatch, gathering batches on the device from per-run
permutations. The anchor ratio is a traced per-run value, so a whole mask-ratio sweep is one
compiled program. `tna_jax.training.fit` drives these programs epoch by epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from tna_jax import anchors
from tna_jax import tree as tree_lib
from tna_jax.data.batching import epoch_indices, gather, steps_per_epoch
from tna_jax.evaluation import cross_entropy
from tna_jax.models import Net
from tna_jax.run_axis import RUN_AXES, RunGroups, loop_over_runs
from tna_jax.runs import Run, RunKeys
from tna_jax.steps import gradient_step

PyTree = Any

__all__ = ["TrainState", "ChunkMetrics", "init_runs", "make_train_epoch", "find_mask", "mask_of"]


class TrainState(NamedTuple):
    """Training state of all runs (every leaf has the leading run axis).

    Attributes:
      params: model parameters.
      model_state: non-parameter collections (``{"batch_stats": ...}`` or ``{}``).
      opt_state: optimizer state (holds the anchor mask when anchors are used).
      step: optimizer steps taken (int32 per run).

    Examples:
      >>> import jax.numpy as jnp
      >>> state = TrainState({"w": jnp.arange(6.0).reshape(3, 2)}, {}, (), jnp.zeros(3, jnp.int32))
      >>> state.variables(1)  # run 1 of the 3 stacked runs, as Flax variables
      {'params': {'w': Array([2., 3.], dtype=float32)}}
    """

    params: PyTree
    model_state: PyTree
    opt_state: PyTree
    step: jax.Array

    def variables(self, run: int | None = None) -> dict[str, PyTree]:
        """Flax variables of one run (or all runs stacked when `run` is None)."""
        v = {"params": self.params, **self.model_state}
        return v if run is None else tree_lib.index(v, run)


def find_mask(opt_state: PyTree) -> PyTree | None:
    """The anchor mask held in an optimizer state.

    Args:
      opt_state: any optimizer state.

    Returns:
      The mask of its `fixed_anchor_mask`, or None when it has none.
    """
    state = anchors.find_state(opt_state)
    return None if state is None else state.mask


def mask_of(state: TrainState) -> PyTree | None:
    """The anchor mask of a train state (see `find_mask`).

    Args:
      state: a `TrainState`.

    Returns:
      The mask (with the run axis), or None.
    """
    return find_mask(state.opt_state)


def init_runs(net: Net, tx_factory: Callable[..., optax.GradientTransformation], runs: Sequence[Run],
              keys: RunKeys, *, share_values: bool = True) -> TrainState:
    """Initial state of every run (vmapped over runs; jit it, or call it under a mesh).

    Every run starts from its own init. Anchored runs chain ``fixed_anchor_mask(values=...)``
    with the values of the anchor-values init (`share_values`: one init shared by every seed, as
    TNA-PFN needs; otherwise each run's own init), which the transform moves the anchors to in
    the first update and holds exactly from the second: the same mechanism as a user's own
    training loop. Pruned entries are zero from the start and held there.

    Args:
      net: the model.
      tx_factory: ``tx(ratio, key, values)`` (`make_transform`).
      runs: the runs (`make_runs`), in run-axis order.
      keys: their keys (`make_run_keys`).
      share_values: anchored runs take their anchor values from `keys.anchor_values` (True) or
        keep their own init values (False).

    Returns:
      A `TrainState` whose leaves have a leading axis of ``len(runs)``.

    Examples:
      >>> import jax, optax
      >>> from tna_jax import models
      >>> from tna_jax.config import default_config
      >>> from tna_jax.optimizers import make_transform
      >>> from tna_jax.runs import arms_from_config, make_run_keys, make_runs
      >>> c = default_config()
      >>> c.num_seeds = 2
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> runs = make_runs(c)  # 2 vanilla + 2 TNA-PFN 0.4
      >>> tx = make_transform(optax.sgd(0.1), c, net, arms_from_config(c))
      >>> keys = make_run_keys(c, runs)
      >>> state = jax.eval_shape(lambda k: init_runs(net, tx, runs, k), keys)  # shapes; jit it to run
      >>> state.params["dense_0"]["kernel"].shape, state.step.shape
      ((4, 4, 8), (4,))
    """
    ratios = jnp.asarray([r.arm.ratio for r in runs], jnp.float32)
    prune = jnp.asarray([r.arm.method == "prune" for r in runs])

    def one(init_key, mask_key, values_key, ratio, is_prune):
        variables = net.init(jax.random.wrap_key_data(init_key))
        params = variables.pop("params")
        mask = find_mask(tx_factory(ratio, jax.random.wrap_key_data(mask_key)).init(params))
        values = None
        if mask is not None:
            values = net.init(jax.random.wrap_key_data(values_key))["params"] if share_values else params
            # Pruned entries: zero from the start (the pruning baseline's model), and held there.
            params = jax.tree.map(lambda p, m: jnp.where(is_prune & m, jnp.zeros_like(p), p), params, mask)
            values = jax.tree.map(lambda v: jnp.where(is_prune, jnp.zeros_like(v), v), values)
        tx = tx_factory(ratio, jax.random.wrap_key_data(mask_key), values)
        return TrainState(params, variables, tx.init(params), jnp.zeros((), jnp.int32))

    return jax.vmap(one)(keys.init, keys.mask, keys.anchor_values, ratios, prune)


class ChunkMetrics(NamedTuple):
    """Per-run sums over the steps of one call (host code aggregates them into epoch means).

    Attributes:
      loss_sum: sum of the training losses of the steps.
      correct: correctly classified training examples.
      steps: steps taken.
      first_nonfinite_step: -1, or the first step (within the epoch) with a non-finite loss.
      nonfinite_loss: the loss value at that step.
    """

    loss_sum: jax.Array  # sum of the training losses of the steps
    correct: jax.Array  # correctly classified training examples
    steps: jax.Array  # steps taken
    first_nonfinite_step: jax.Array  # -1, or the first step (within the epoch) with a non-finite loss
    nonfinite_loss: jax.Array  # the loss value at that step


def make_train_epoch(net: Net, tx: optax.GradientTransformation, *, num_train: int, batch_size: int,
                     augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                     label_smoothing: float = 0.0, donate: bool = True, num_steps: int | None = None,
                     unroll: int | bool = 1, run_axis: str = "vmap", mesh: Mesh | None = None):
    """Builds ``train_chunk(state, data_keys, dropout_keys, epoch, start, x_train, y_train)``.

    One call trains every run for `num_steps` consecutive steps of epoch `epoch`, starting at step
    `start` (default: the whole epoch from step 0): vmap over runs of a ``lax.scan`` over steps.
    The epoch's batch order is a function of (data key, epoch) only, so an epoch cut into chunks
    (or interrupted and resumed between chunks) takes exactly the same steps. The function is
    jitted with the state donated (updated in place); `start` is traced, so every chunk of the
    same length shares one compilation. `unroll` is ``lax.scan``'s: ``True`` unrolls the chunk's
    steps completely (see :func:`loop_plan`).

    How the runs are mapped is `run_axis`: ``"vmap"`` batches them (the fast path on GPU/TPU, and
    on CPU for nets without convolutions); ``"loop"`` traces one copy of the step per run inside
    the same program, because XLA:CPU turns a vmapped convolution into a grouped one that runs
    several times slower than the same convolutions one after another (4 ResNet-20 seeds: about
    10x, :func:`run_axis_plan`). With a
    `mesh` of several devices, ``"loop"`` is a ``shard_map`` over the mesh's ``"runs"`` axis and
    each device loops over its own runs only. Both give the same numbers (tested).

    Args:
      net: the model.
      tx: the optimizer that updates every run (``make_transform(...)(0.0, key)``: it reads each
        run's ratio and mask from that run's state).
      num_train: training examples (the data arrays passed to the chunk have this many rows).
      batch_size: examples per step (the last partial batch of an epoch is dropped).
      augment: optional ``augment(key, x) -> x`` applied to every batch inside the step.
      label_smoothing: of the cross-entropy.
      donate: donate the state's buffers to the call (the input state is then invalid).
      num_steps: steps per call, in ``[1, steps per epoch]`` (None: the whole epoch).
      unroll: ``lax.scan``'s unroll.
      run_axis: ``"vmap"`` or ``"loop"`` (see above).
      mesh: for ``"loop"`` on several devices, the mesh the runs are sharded over
        (:func:`run_mesh`); the data arrays are then replicated over it.

    Returns:
      The jitted ``train_chunk``, which returns ``(new_state, ChunkMetrics)`` with per-run sums.

    Raises:
      ValueError: `num_steps` outside ``[1, steps per epoch]``, or an unknown `run_axis`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from tna_jax import models
      >>> from tna_jax.config import default_config
      >>> from tna_jax.optimizers import make_transform
      >>> from tna_jax.runs import arms_from_config, make_run_keys, make_runs
      >>> c = default_config()
      >>> c.num_seeds = 1
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> runs = make_runs(c)  # vanilla and TNA-PFN 0.4, one seed each
      >>> tx = make_transform(optax.sgd(0.1), c, net, arms_from_config(c))
      >>> keys = make_run_keys(c, runs)
      >>> state = jax.eval_shape(lambda k: init_runs(net, tx, runs, k), keys)
      >>> update_tx = tx(0.0, jax.random.key(0))  # update() reads each run's ratio and mask from its state
      >>> chunk = make_train_epoch(net, update_tx, num_train=10, batch_size=4)  # 2 steps per epoch
      >>> x, y = jnp.ones((10, 4)), jnp.zeros(10, jnp.int32)
      >>> _, metrics = jax.eval_shape(chunk, state, keys.data, keys.dropout, 0, 0, x, y)  # traced only
      >>> metrics.loss_sum.shape  # one sum per run
      (2,)
      >>> make_train_epoch(net, update_tx, num_train=10, batch_size=4, num_steps=3)
      Traceback (most recent call last):
      ...
      ValueError: num_steps must be in [1, 2] (steps per epoch); got 3.
    """
    steps_total = steps_per_epoch(num_train, batch_size)
    steps = steps_total if num_steps is None else int(num_steps)
    if not 1 <= steps <= steps_total:
        raise ValueError(f"num_steps must be in [1, {steps_total}] (steps per epoch); got {num_steps!r}.")
    if run_axis not in RUN_AXES:
        raise ValueError(f"run_axis must be one of {RUN_AXES}; got {run_axis!r}.")

    def run_chunk(state: TrainState, data_key, dropout_key, epoch, start, x_train, y_train):
        data_key = jax.random.wrap_key_data(data_key)
        order_key, aug_key = jax.random.split(jax.random.fold_in(data_key, epoch))
        rows = epoch_indices(order_key, num_train, batch_size)
        rows = jax.lax.dynamic_slice_in_dim(rows, start, steps, axis=0)
        dropout_key = jax.random.fold_in(jax.random.wrap_key_data(dropout_key), epoch)

        def step(carry, inputs):
            state, loss_sum, correct_sum, bad_step, bad_loss = carry
            i, idx = inputs
            x, y = gather(x_train, idx), gather(y_train, idx)
            if augment is not None:
                x = augment(jax.random.fold_in(aug_key, i), x)

            def loss_fn(params):
                logits, new_model_state = net.apply({"params": params, **state.model_state}, x, train=True,
                                                    rng=jax.random.fold_in(dropout_key, i))
                loss = cross_entropy(logits, y, label_smoothing).mean()
                return loss, (logits, new_model_state)

            (loss, (logits, new_model_state)), params, opt_state = gradient_step(
                loss_fn, tx, state.params, state.opt_state, has_aux=True)
            model_state = {**state.model_state, **new_model_state}
            correct = jnp.sum(jnp.argmax(logits, -1) == y)
            first_bad = (bad_step < 0) & ~jnp.isfinite(loss)
            bad_step = jnp.where(first_bad, i, bad_step)
            bad_loss = jnp.where(first_bad, loss, bad_loss)
            new_state = TrainState(params, model_state, opt_state, state.step + 1)
            return (new_state, loss_sum + loss, correct_sum + correct, bad_step, bad_loss), None

        init = (state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), jnp.array(-1, jnp.int32),
                jnp.zeros((), jnp.float32))
        (state, loss_sum, correct_sum, bad_step, bad_loss), _ = jax.lax.scan(
            step, init, (start + jnp.arange(steps), rows), unroll=unroll)
        return state, ChunkMetrics(loss_sum, correct_sum, jnp.full((), steps, jnp.int32), bad_step, bad_loss)

    if run_axis == "vmap":
        batched = jax.vmap(run_chunk, in_axes=(0, 0, 0, None, None, None, None))
        return jax.jit(batched, donate_argnums=(0,) if donate else ())
    program = jax.jit(loop_over_runs(run_chunk, num_mapped=3, mesh=mesh), donate_argnums=(0,) if donate else ())
    return RunGroups(program, num_mapped=3, mesh=mesh)
