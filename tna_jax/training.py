"""Multi-seed training: many models as one pytree, one jitted and scanned epoch trains them all.

The unit of work is a *run*: one model trained with one arm (plain, TNA-PFN at ratio ρ, or
prune-at-init at ratio ρ) from one seed. All runs of an experiment are stacked on a leading axis
of every array (params, BatchNorm statistics, optimizer state, keys), and

* ``jax.vmap`` maps the per-run step over that axis (the anchor ratio is a traced per-run value,
  so a whole mask-ratio sweep is one compiled program),
* ``jax.lax.scan`` runs the steps of an epoch inside one dispatch (batches are gathered on the
  device from per-run permutations: no host-to-device copies during training),
* the run axis is sharded over ``jax.devices()`` with a ``Mesh`` and ``NamedSharding``, padded
  to a multiple of the device count (padding runs are never reported).

Keys are split by purpose from ``config.seed``: model init, data order (and augmentation),
anchor mask, anchor values and dropout each have their own stream, so "same mask, different
init" is one setting away (``config.seeds.vary``, ``config.anchor.share_mask``,
``config.anchor.share_values``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tna_jax import anchors, distributed, logs
from tna_jax import checkpoint as ckpt_lib
from tna_jax import tree as tree_lib
from tna_jax.data import DeviceData
from tna_jax.data.batching import epoch_indices, gather, steps_per_epoch
from tna_jax.evaluation import cross_entropy, evaluate_runs
from tna_jax.harness import Loop, Preempted, StopSignal, TrainingDiverged, resume
from tna_jax.models import Net
from tna_jax.optimizers import make_optimizer, make_transform
from tna_jax.run_axis import RUN_AXES, RunGroups, loop_group_size, loop_over_runs, loop_plan, resolve_run_axis
from tna_jax.runs import Arm, Run, RunKeys, arms_from_config, make_run_keys, make_runs, padded_runs
from tna_jax.sharding import check_fits_in_memory, replicate, run_mesh, shard_runs
from tna_jax.steps import gradient_step

PyTree = Any

__all__ = [
    "TrainState", "TrainResult", "TrainingDiverged", "Preempted", "StopSignal", "ChunkMetrics",
    "init_runs", "make_train_epoch", "fit", "summarize", "find_mask", "mask_of",
]

# Names that lived here before the split into runs / optimizers / evaluation / run_axis /
# sharding (0.1): still importable from `tna_jax.training` for one release, with a warning.
_MOVED = {
    **{n: "tna_jax.runs" for n in ("Arm", "Run", "RunKeys", "PURPOSES", "arms_from_config", "make_runs",
                                  "make_run_keys", "padded_runs")},
    **{n: "tna_jax.optimizers" for n in ("make_optimizer", "anchor_options", "make_transform")},
    **{n: "tna_jax.evaluation" for n in ("cross_entropy", "make_eval_fn", "evaluate_runs")},
    **{n: "tna_jax.run_axis" for n in ("RUN_AXES", "MAX_LOOPED_RUNS", "RunGroups", "loop_group_size",
                                      "loop_over_runs", "run_axis_plan", "uses_convolutions", "loop_plan",
                                      "resolve_run_axis", "AUTO_UNROLL_STEPS")},
    **{n: "tna_jax.sharding" for n in ("run_mesh", "shard_runs", "replicate", "device_memory_bytes",
                                      "check_fits_in_memory")},
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"tna_jax.training.{name} moved to {_MOVED[name]}.{name}; the old name goes in the next "
                      "release.", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'tna_jax.training' has no attribute {name!r}")



# ---------------------------------------------------------------------------------------------
# What is trained: arms x seeds.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Keys.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Optimizer.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# State and initialisation.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Sharding.
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
      state: the final :class:`TrainState` of the real runs (padding removed), on the host mesh.
      runs: the runs, in the order of the state's leading axis.
      history: per-epoch metrics (list of dicts, one per epoch and run).
      test: final per-run test metrics ``{"loss": [...], "accuracy": [...]}``.
      val: final per-run validation metrics.
      mask: the anchor mask of every run (stacked) or None.
      seconds: wall time of training (excluding set-up).
      resumed_from: the epoch training resumed from (0 for a fresh run).

    Examples:
      >>> import numpy as np
      >>> runs = [Run(0, 0, Arm("none", 0.0), 0), Run(1, 1, Arm("anchor", 0.4), 0), Run(2, 1, Arm("anchor", 0.4), 1)]
      >>> result = TrainResult(state=None, runs=runs, history=[], test={"accuracy": np.array([0.7, 0.6, 0.65])},
      ...                      val={}, mask=None, seconds=1.0, resumed_from=0)
      >>> result.arm_runs(1), float(result.test["accuracy"][result.arm_runs(1)].mean())
      ([1, 2], 0.625)
    """

    state: TrainState
    runs: list[Run]
    history: list[dict[str, Any]]
    test: dict[str, np.ndarray]
    val: dict[str, np.ndarray]
    mask: PyTree | None
    seconds: float
    resumed_from: int

    def arm_runs(self, arm_index: int) -> list[int]:
        return [r.index for r in self.runs if r.arm_index == arm_index]


def _slice_runs(tree: PyTree, n: int) -> PyTree:
    return jax.tree.map(lambda x: x[:n], tree)


def fit(config: Any, net: Net, dataset: Any, *, workdir: str | None = None,
        augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
        devices: Sequence[Any] | None = None, log: Callable[[str], None] = print,
        on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
        hooks: Sequence[Any] | None = None) -> TrainResult:
    """Trains every run of `config` on `dataset` and returns a :class:`TrainResult`.

    An epoch is one jitted call, or several of ``train.steps_per_call`` steps each (the
    granularity at which a SIGTERM is honoured). With a `workdir`: metrics go to
    ``metrics.jsonl`` and TensorBoard (one line per epoch and run), orbax checkpoints (state plus
    the anchor mask beside it; numbered by optimizer step) to ``checkpoints/`` every
    ``train.checkpoint_every`` epochs and at the end; rerunning resumes from the latest good
    checkpoint and ends bit-identical to an uninterrupted run on the same devices (every step's
    randomness is a function of the run's keys, the epoch and the step only).

    Args:
      config: the experiment config (:func:`tna_jax.config.default_config`): arms and seeds,
        ``train``, ``optimizer``, ``anchor``, ``prune``, ``data.normalize``.
      net: the model (:func:`tna_jax.models.build`).
      dataset: a host :class:`tna_jax.data.Dataset` (moved to the devices here).
      workdir: where metrics, TensorBoard logs and checkpoints go (None: nothing is written and
        nothing resumed).
      augment: optional ``augment(key, x) -> x`` applied in the training step.
      devices: the devices the run axis is sharded over (default ``jax.devices()``).
      log: where the one-line summaries go.
      on_epoch: optional ``on_epoch(epoch, {"rows": [...]})`` called after every epoch.
      hooks: callables ``hook(point, directory)`` called at the loop's named points
        (:mod:`tna_jax.hooks`; None: those installed with ``tna_jax.hooks.installed``).

    Returns:
      A :class:`TrainResult` (state, runs, per-epoch history, final test/validation metrics,
      masks, timing).

    Raises:
      ValueError: ``config.train.batch_size`` exceeds the training examples.
      TrainingDiverged: a run's loss became NaN/inf (message names the run, epoch and step); the
        last good checkpoint is kept.
      Preempted: SIGTERM/SIGINT arrived; the state was checkpointed at the next step boundary
        (end of the current call) and training stopped.

    Examples:
      A run is ``result = fit(config, net, dataset, workdir="runs/x")`` (``tests/test_training.py``
      trains real ones; here nothing is compiled): a bad batch size is refused before any work.

      >>> import numpy as np
      >>> from tna_jax import models
      >>> from tna_jax.config import default_config
      >>> from tna_jax.data import Dataset
      >>> x, y = np.zeros((40, 4), np.float32), np.arange(40, dtype=np.int32) % 2
      >>> ds = Dataset("toy", x[:30], y[:30], x[30:35], y[30:35], x[35:], y[35:], num_classes=2)
      >>> c = default_config()
      >>> c.train.batch_size = 64
      >>> fit(c, models.build({"name": "mlp", "depth": 0}, ds.input_shape, ds.num_classes), ds)
      Traceback (most recent call last):
      ...
      ValueError: config.train.batch_size=64 exceeds the 30 training examples of toy.
    """
    from tna_jax.data import to_device

    t_setup = time.time()
    runs = make_runs(config)
    arms = arms_from_config(config)
    devices = list(devices) if devices is not None else jax.devices()
    mesh = run_mesh(devices)
    all_runs = padded_runs(runs, len(devices))
    n_real = len(runs)

    data: DeviceData = to_device(dataset, normalize=config.data.normalize)
    data = replicate(data, mesh)
    num_train = int(data.x_train.shape[0])
    bs = int(config.train.batch_size)
    if bs > num_train:
        raise ValueError(f"config.train.batch_size={bs} exceeds the {num_train} training examples of "
                         f"{dataset.name}.")
    spe = steps_per_epoch(num_train, bs)
    epochs = int(config.train.epochs)
    base = make_optimizer(config.optimizer, spe, epochs)
    tx_factory = make_transform(base, config, net, arms)
    update_tx = tx_factory(0.0, jax.random.key(0))  # update() reads ratio/mask from the state
    keys = shard_runs(make_run_keys(config, all_runs), mesh)

    share = bool(config.anchor.share_values)
    init_fn = jax.jit(lambda k: init_runs(net, tx_factory, all_runs, k, share_values=share),
                      out_shardings=NamedSharding(mesh, PartitionSpec("runs")))
    abstract_state = jax.eval_shape(lambda k: init_runs(net, tx_factory, all_runs, k, share_values=share), keys)
    run_sharding = NamedSharding(mesh, PartitionSpec("runs"))
    abstract_state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=run_sharding),
                                  abstract_state)
    check_fits_in_memory(abstract_state, devices, len(all_runs))

    checkpointer, state, meta = _open_checkpoints(workdir, config, arms, abstract_state, spe, log)
    start_epoch, start_step = int(meta.get("epoch", 0)), int(meta.get("step_in_epoch", 0))
    partial = meta.get("partial_sums")
    # Several processes: process 0 writes the metrics and logs; all take part in the checkpoints.
    primary = distributed.is_primary()
    if not primary:
        log = _silent
    metrics_log = logs.MetricsLog(workdir if primary else None, [r.describe() for r in runs], start_epoch,
                                  tensorboard=config.train.tensorboard)
    if state is None:
        state = init_fn(keys)

    run_axis = resolve_run_axis(config, net)
    chunk, unroll = loop_plan(net, spe, int(config.train.steps_per_call), int(config.train.unroll),
                              runs_per_device=loop_group_size(len(all_runs) // mesh.size) if run_axis == "loop" else 1)
    chunk_fns: dict[int, Any] = {}

    def train_chunk(num_steps: int):
        if num_steps not in chunk_fns:
            chunk_fns[num_steps] = make_train_epoch(
                net, update_tx, num_train=num_train, batch_size=bs, augment=augment,
                label_smoothing=float(config.train.label_smoothing), num_steps=num_steps, unroll=unroll,
                run_axis=run_axis, mesh=mesh)
        return chunk_fns[num_steps]

    def save(epoch: int, step_in_epoch: int = 0, sums: dict[str, np.ndarray] | None = None) -> None:
        mask = mask_of(state)
        meta = {"epoch": epoch, "step_in_epoch": step_in_epoch, "steps_per_epoch": spe,
                "runs": [r.describe() for r in runs], "num_padded_runs": len(all_runs) - n_real}
        if sums is not None:
            meta["partial_sums"] = {k: v.tolist() for k, v in sums.items()}
        checkpointer.save(epoch * spe + step_in_epoch, state, extras=None if mask is None else {"mask": mask}, meta=meta)

    setup_seconds = time.time() - t_setup
    t0 = time.time()
    with Loop(epochs, start=start_epoch, unit="epoch", checkpointer=checkpointer,
              checkpoint_every=config.train.checkpoint_every, metrics=metrics_log,
              progress=config.train.progress and primary, desc=f"{len(runs)} runs", hooks=hooks,
              agree=distributed.any_process) as loop:
        for epoch in loop.iterations():
            step_in_epoch = start_step if epoch == start_epoch else 0
            if epoch == start_epoch and partial:
                sums = {k: np.asarray(v, np.float64) for k, v in partial.items()}
            else:
                sums = {k: np.zeros(len(all_runs), np.float64) for k in ("loss_sum", "correct", "steps")}
            while step_in_epoch < spe:
                n = min(chunk, spe - step_in_epoch)
                state, m = train_chunk(n)(state, keys.data, keys.dropout, epoch, step_in_epoch,
                                          data.x_train, data.y_train)
                m = distributed.to_host(m)  # the runs of every process
                _check_finite(loop, m, runs, epoch, spe, config.optimizer.learning_rate)
                for k in sums:
                    sums[k] += getattr(m, k)
                step_in_epoch += n
                loop.point(f"chunk_end:{epoch}.{step_in_epoch}")
                # A signal to one process stops every process at the same step boundary.
                if distributed.any_process(loop.stop_requested) and step_in_epoch < spe:
                    loop.save(f"{epoch}.{step_in_epoch}", lambda e=epoch, s=step_in_epoch, t=sums: save(e, s, t))
                    raise loop.preempted(f"at step {step_in_epoch} of {spe} in epoch {epoch + 1}")
            done = epoch + 1
            val = None
            if (done % config.train.eval_every == 0 or done == epochs) and data.x_val.shape[0]:
                val = evaluate_runs(net, state, (data.x_val, data.y_val), batch_size=config.train.eval_batch_size)
            rows = _epoch_rows(runs, done, sums, bs, val)
            loop.log(rows)
            loop.point(f"epoch_end:{done}")
            if on_epoch is not None:
                on_epoch(done, {"rows": rows})
            loop.end_iteration(done, lambda d=done: save(d), postfix=_postfix(rows, arms, val is not None),
                               where=f"after epoch {done}")
    seconds = time.time() - t0
    test = evaluate_runs(net, state, (data.x_test, data.y_test), batch_size=config.train.eval_batch_size)._asdict()
    val = evaluate_runs(net, state, (data.x_val, data.y_val), batch_size=config.train.eval_batch_size)._asdict() \
        if data.x_val.shape[0] else {"loss": np.full(len(all_runs), np.nan), "accuracy": np.full(len(all_runs), np.nan)}
    real_state = _slice_runs(state, n_real)
    mask = mask_of(real_state)
    log(f"trained {n_real} runs x {epochs - start_epoch} epochs in {seconds:.1f}s (set-up {setup_seconds:.1f}s, "
        f"{len(devices)} device(s))")
    return TrainResult(state=real_state, runs=list(runs), history=metrics_log.rows,
                       test={k: v[:n_real] for k, v in test.items()}, val={k: v[:n_real] for k, v in val.items()},
                       mask=mask, seconds=seconds, resumed_from=start_epoch)


def _open_checkpoints(workdir: str | None, config: Any, arms: Sequence[Arm], abstract_state: TrainState, spe: int,
                      log: Callable[[str], None]) -> tuple[Any, TrainState | None, dict[str, Any]]:
    """The workdir's checkpointer, and the state and metadata of its latest good checkpoint
    (``(None, None, {})`` without a workdir; state None and ``{}`` for a fresh run)."""
    if not workdir:
        return None, None, {}
    scheme = anchors.MASK_SCHEME if any(a.ratio > 0 for a in arms) else None
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                                         mask_scheme=scheme)
    resumed = resume(checkpointer, abstract_state,
                     lambda meta: int(meta["epoch"]) * spe + int(meta.get("step_in_epoch", 0)))
    if resumed is None:
        return checkpointer, None, {}
    state, meta = resumed
    epoch, step = int(meta["epoch"]), int(meta.get("step_in_epoch", 0))
    where = f"epoch {epoch}" + (f", step {step} of epoch {epoch + 1}" if step else "")
    log(f"resuming from the checkpoint of {where} in {checkpointer.directory}")
    return checkpointer, state, meta


def _check_finite(loop: Loop, m: ChunkMetrics, runs: Sequence[Run], epoch: int, spe: int, lr: float) -> None:
    """Raises the loop's `TrainingDiverged` naming the first run whose loss became NaN/inf."""
    bad = [i for i in range(len(runs)) if m.first_nonfinite_step[i] >= 0]
    if not bad:
        return
    i = bad[0]
    raise loop.diverged(
        f"training diverged: run {i} ({runs[i].arm.label}, seed {runs[i].seed}) had loss "
        f"{float(m.nonfinite_loss[i])} at epoch {epoch + 1}, step {int(m.first_nonfinite_step[i]) + 1} of {spe}"
        + (f" ({len(bad)} runs diverged)" if len(bad) > 1 else "") + f". Lower config.optimizer.learning_rate (now {lr})")


def _epoch_rows(runs: Sequence[Run], done: int, sums: dict[str, np.ndarray], batch_size: int,
                val: Any) -> list[dict[str, Any]]:
    """One metrics row per real run of epoch `done` (means of the epoch's sums)."""
    rows = []
    for i, run in enumerate(runs):
        row = {"epoch": done, **run.describe(), "train_loss": float(sums["loss_sum"][i] / sums["steps"][i]),
               "train_accuracy": float(sums["correct"][i] / (sums["steps"][i] * batch_size))}
        if val is not None:
            row["val_loss"] = float(val.loss[i])
            row["val_accuracy"] = float(val.accuracy[i])
        rows.append(row)
    return rows


def _silent(message: str) -> None:
    """The log of a process other than process 0 (which alone prints)."""


def _postfix(rows: list[dict[str, Any]], arms: Sequence[Arm], has_val: bool) -> dict[str, str]:
    key = "val_accuracy" if has_val else "train_accuracy"
    out = {"loss": f"{np.mean([r['train_loss'] for r in rows]):.3f}"}
    for a in arms:
        accs = [r[key] for r in rows if r["arm"] == a.label]
        if accs:
            out[a.label] = f"{np.mean(accs):.3f}"
    return out


def summarize(result: TrainResult) -> list[dict[str, Any]]:
    """Per-arm mean and sample standard deviation (ddof=1; None for one seed) over the seeds of the
    final test metrics, and the mean validation accuracy (None without a validation split).

    Args:
      result: what `fit` returned.

    Returns:
      One dict per arm.
    """
    from tna_jax.report import mean_std

    arms: dict[int, list[Run]] = {}
    for r in result.runs:
        arms.setdefault(r.arm_index, []).append(r)
    rows = []
    for runs in arms.values():
        idx = [r.index for r in runs]
        acc = result.test["accuracy"][idx]
        loss = result.test["loss"][idx]
        rows.append({
            "arm": runs[0].arm.label, "method": runs[0].arm.method, "ratio": runs[0].arm.ratio,
            "seeds": len(idx),
            **dict(zip(("test_accuracy_mean", "test_accuracy_std"), mean_std(acc))),
            **dict(zip(("test_loss_mean", "test_loss_std"), mean_std(loss))),
            "val_accuracy_mean": mean_std(result.val["accuracy"][idx][np.isfinite(result.val["accuracy"][idx])])[0],
        })
    return rows
