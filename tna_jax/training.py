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
import functools
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tna_jax import anchors, faults, logs
from tna_jax import checkpoint as ckpt_lib
from tna_jax import tree as tree_lib
from tna_jax.data import DeviceData
from tna_jax.data.batching import epoch_indices, eval_indices, gather, steps_per_epoch
from tna_jax.models import Net

PyTree = Any

__all__ = [
    "Arm", "Run", "TrainState", "RunKeys", "TrainResult", "TrainingDiverged", "Preempted",
    "arms_from_config", "make_runs", "make_run_keys", "make_optimizer", "make_transform",
    "init_runs", "make_train_epoch", "make_eval_fn", "evaluate_runs", "cross_entropy",
    "run_mesh", "shard_runs", "fit", "StopSignal", "loop_over_runs", "run_axis_plan",
    "resolve_run_axis", "RunGroups", "loop_group_size",
]


class TrainingDiverged(RuntimeError):
    """A run produced a non-finite loss; training stopped and the last good checkpoint stays."""


class Preempted(RuntimeError):
    """SIGTERM (or SIGINT) arrived; a checkpoint was saved at the next step boundary."""


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint and stop cleanly.

    Installed only in the main thread (Python's rule for signal handlers); :meth:`restore` puts
    the previous handlers back. Every long loop of tna_jax (``fit``, federated rounds) polls
    ``signal`` at its step or round boundary, saves a checkpoint and raises :class:`Preempted`.

    Attributes:
      signal: the signal number received, or None.

    Examples:
      >>> import os, signal
      >>> stop = StopSignal()
      >>> os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
      >>> stop.signal == signal.SIGTERM
      True
      >>> stop.restore()
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means: stop now
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def message(self, epoch: int, step: int, steps_per_epoch: int, checkpointer: Any) -> str:
        name = signal.Signals(self.signal).name if self.signal is not None else "signal"
        where = f"after epoch {epoch}" if not step else f"at step {step} of {steps_per_epoch} in epoch {epoch + 1}"
        saved = f"checkpoint saved in {checkpointer.directory}" if checkpointer is not None else "no workdir, nothing saved"
        return f"stopped by {name} {where}; {saved}. Rerun the same command to resume."


# ---------------------------------------------------------------------------------------------
# What is trained: arms x seeds.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training recipe: ``method`` in {"none", "anchor", "prune"} at mask ratio ``ratio``.

    Attributes:
      method: ``"none"`` (plain training), ``"anchor"`` (TNA-PFN) or ``"prune"`` (prune-at-init).
      ratio: the mask ratio ρ in [0, 1].

    Examples:
      >>> Arm("anchor", 0.4).label, Arm("none", 0.0).label, Arm("prune", 0.2).label
      ('TNA-PFN 0.4', 'vanilla', 'prune 0.2')
    """

    method: str
    ratio: float

    @property
    def label(self) -> str:
        if self.method == "none" or self.ratio == 0.0:
            return "vanilla"
        name = "TNA-PFN" if self.method == "anchor" else "prune"
        return f"{name} {self.ratio:g}"


@dataclasses.dataclass(frozen=True)
class Run:
    """One model: an arm and a seed index; ``index`` is its place on the run axis.

    Attributes:
      index: position on the run axis (arm-major: ``arm_index * num_seeds + seed``).
      arm_index: the arm's position in :func:`arms_from_config`.
      arm: the :class:`Arm`.
      seed: the seed index within the arm.

    Examples:
      >>> Run(3, 1, Arm("anchor", 0.4), 1).describe()
      {'run': 3, 'arm': 'TNA-PFN 0.4', 'method': 'anchor', 'ratio': 0.4, 'seed': 1}
    """

    index: int
    arm_index: int
    arm: Arm
    seed: int

    def describe(self) -> dict[str, Any]:
        return {"run": self.index, "arm": self.arm.label, "method": self.arm.method,
                "ratio": self.arm.ratio, "seed": self.seed}


def arms_from_config(config: Any) -> tuple[Arm, ...]:
    """The arms an experiment trains.

    * ``config.sweep.anchor_ratios`` / ``config.sweep.prune_ratios`` non-empty: exactly those arms
      (ratio 0 in either list is the plain arm).
    * otherwise the main arm (prune-at-init when ``config.prune.ratio > 0``, else TNA-PFN at
      ``config.anchor.ratio``; ratio 0 is plain training) and, when ``config.baseline`` is set
      and the main arm is not plain, a plain arm with the same seeds.

    Args:
      config: the experiment config (:func:`tna_jax.config.default_config`).

    Returns:
      The arms, in run-axis order.

    Examples:
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> [a.label for a in arms_from_config(c)]
      ['vanilla', 'TNA-PFN 0.4']
      >>> c.sweep.anchor_ratios, c.sweep.prune_ratios = (0.0, 0.2), (0.2,)
      >>> [a.label for a in arms_from_config(c)]
      ['vanilla', 'TNA-PFN 0.2', 'prune 0.2']
    """
    sweep_a = [float(r) for r in config.sweep.anchor_ratios]
    sweep_p = [float(r) for r in config.sweep.prune_ratios]
    if sweep_a or sweep_p:
        arms = [Arm("none" if r == 0 else "anchor", r) for r in sweep_a]
        arms += [Arm("none" if r == 0 else "prune", r) for r in sweep_p]
        seen, unique = set(), []
        for a in arms:
            key = (a.method, a.ratio)
            if key not in seen:
                seen.add(key)
                unique.append(a)
        return tuple(unique)
    if config.prune.ratio > 0:
        main = Arm("prune", float(config.prune.ratio))
    elif config.anchor.ratio > 0:
        main = Arm("anchor", float(config.anchor.ratio))
    else:
        main = Arm("none", 0.0)
    if config.baseline and main.method != "none":
        return (Arm("none", 0.0), main)
    return (main,)


def make_runs(config: Any) -> list[Run]:
    """All runs, arm-major: run ``a * num_seeds + s`` is arm ``a`` with seed ``s``.

    Args:
      config: the experiment config.

    Returns:
      One :class:`Run` per (arm, seed).

    Examples:
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.num_seeds = 2
      >>> [(r.index, r.arm.label, r.seed) for r in make_runs(c)]
      [(0, 'vanilla', 0), (1, 'vanilla', 1), (2, 'TNA-PFN 0.4', 0), (3, 'TNA-PFN 0.4', 1)]
    """
    arms = arms_from_config(config)
    return [Run(a * config.num_seeds + s, a, arm, s) for a, arm in enumerate(arms) for s in range(config.num_seeds)]


# ---------------------------------------------------------------------------------------------
# Keys.
# ---------------------------------------------------------------------------------------------

PURPOSES = ("init", "data", "mask", "anchor_values", "dropout")


class RunKeys(NamedTuple):
    """Raw uint32 key data per run (leading run axis), one stream per purpose.

    Attributes:
      init, data, mask, anchor_values, dropout: uint32 arrays of shape ``(runs, 2)``, one stream
        per purpose (wrap a row with ``jax.random.wrap_key_data``).

    Examples:
      >>> import jax.numpy as jnp
      >>> RunKeys(*[jnp.zeros((3, 2), jnp.uint32)] * 5)._fields
      ('init', 'data', 'mask', 'anchor_values', 'dropout')
    """

    init: jax.Array
    data: jax.Array
    mask: jax.Array
    anchor_values: jax.Array
    dropout: jax.Array


def make_run_keys(config: Any, runs: Sequence[Run]) -> RunKeys:
    """Per-run keys from ``config.seed``.

    ``seeds.vary``: "both" (default) gives each seed its own init and data order; "init" shares
    the data order; "data" shares the init. ``anchor.share_mask`` shares the mask key across
    seeds; ``anchor.share_values`` makes every seed take its anchored values from one shared
    initialisation. Runs of different arms with the same seed get the same keys (paired).

    Args:
      config: the experiment config (``seed``, ``seeds.vary``, ``anchor.share_mask``,
        ``anchor.share_values``).
      runs: the runs (:func:`make_runs`).

    Returns:
      :class:`RunKeys` with arrays of shape ``(len(runs), 2)`` (raw key data).

    Examples:
      >>> import numpy as np
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.num_seeds = 2
      >>> keys = make_run_keys(c, make_runs(c))
      >>> keys.init.shape, bool(np.array_equal(keys.mask[0], keys.mask[1]))  # one mask key for every seed
      ((4, 2), True)
    """
    root = jax.random.key(config.seed)
    purpose = {p: jax.random.fold_in(root, i) for i, p in enumerate(PURPOSES)}
    vary = config.seeds.vary

    def per_seed(name: str, seed: int, shared: bool) -> jax.Array:
        return jax.random.key_data(jax.random.fold_in(purpose[name], 0 if shared else seed + 1))

    rows = []
    for run in runs:
        s = run.seed
        rows.append(RunKeys(
            init=per_seed("init", s, vary == "data"),
            data=per_seed("data", s, vary == "init"),
            mask=per_seed("mask", s, config.anchor.share_mask),
            anchor_values=per_seed("anchor_values", s, config.anchor.share_values),
            dropout=per_seed("dropout", s, False),
        ))
    return RunKeys(*[jnp.stack(xs) for xs in zip(*rows)])


# ---------------------------------------------------------------------------------------------
# Optimizer.
# ---------------------------------------------------------------------------------------------


def make_optimizer(opt_config: Any, steps_per_epoch_: int, epochs: int) -> optax.GradientTransformation:
    """The base optimizer (without anchors) from ``config.optimizer``.

    ``name``: sgd | momentum | adam | adamw | lion; ``schedule``: constant | cosine (decay to 0
    over training) | warmup_cosine (``warmup_epochs`` of linear warm-up); ``weight_decay``
    (decoupled for adamw/lion, added to the gradient otherwise); ``grad_clip_norm`` > 0 clips
    by global norm first.

    Args:
      opt_config: ``config.optimizer``.
      steps_per_epoch_: optimizer steps per epoch (for the schedules).
      epochs: training epochs (for the schedules).

    Returns:
      An optax ``GradientTransformation`` (chain :func:`tna_jax.anchors.fixed_anchor_mask` after it).

    Raises:
      ValueError: an unknown optimizer name.

    Examples:
      >>> import jax.numpy as jnp
      >>> from tna_jax.config import default_config
      >>> tx = make_optimizer(default_config().optimizer, steps_per_epoch_=10, epochs=2)  # SGD, lr 0.05
      >>> updates, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.zeros(2)}))
      >>> [round(float(u), 4) for u in updates["w"]]
      [-0.05, -0.05]
    """
    lr = float(opt_config.learning_rate)
    total = max(1, steps_per_epoch_ * epochs)
    if opt_config.schedule == "constant":
        schedule: Any = lr
    elif opt_config.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(lr, total)
    else:
        warmup = int(round(opt_config.warmup_epochs * steps_per_epoch_))
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(total, warmup + 1))
    name, wd = opt_config.name, float(opt_config.weight_decay)
    parts = []
    if opt_config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(opt_config.grad_clip_norm)))
    if name in ("sgd", "momentum", "adam") and wd > 0:
        parts.append(optax.add_decayed_weights(wd))
    if name == "sgd":
        parts.append(optax.sgd(schedule))
    elif name == "momentum":
        parts.append(optax.sgd(schedule, momentum=float(opt_config.momentum)))
    elif name == "adam":
        parts.append(optax.adam(schedule))
    elif name == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=wd))
    elif name == "lion":
        parts.append(optax.lion(schedule, weight_decay=wd))
    else:
        raise ValueError(f"config.optimizer.name must be one of ('sgd', 'momentum', 'adam', 'adamw', 'lion'); got {name!r}.")
    return optax.chain(*parts) if len(parts) > 1 else parts[0]


def _patterns(text: str) -> list[str] | None:
    items = [p.strip() for p in text.split(",") if p.strip()] if text else []
    return items or None


def anchor_options(config: Any, net: Net) -> dict[str, Any]:
    """Keyword arguments of :func:`tna_jax.anchors.anchor_mask` from ``config.anchor``."""
    return dict(granularity=config.anchor.granularity, include=_patterns(config.anchor.include),
                exclude=_patterns(config.anchor.exclude), layer_order=net.layer_order())


def make_transform(base: optax.GradientTransformation, config: Any, net: Net, arms: Sequence[Arm]
                   ) -> Callable[..., optax.GradientTransformation]:
    """``tx(ratio, key, values=None)``: the optimizer of one run, with ``fixed_anchor_mask``
    appended when any arm masks weights. Its ``update`` reads everything (mask, ratio, key,
    values) from the state, so one instance updates every run; ``init`` is called per run
    (inside vmap) with the run's ratio, key and anchor values.

    Args:
      base: the base optimizer (`make_optimizer`).
      config: the experiment config (`config.anchor`: granularity, include/exclude patterns,
        `refresh_every`).
      net: the model (its layer order feeds the named layer selections).
      arms: the arms of the experiment (`arms_from_config`); when none has a ratio > 0 the
        factory returns `base` unchanged.

    Returns:
      ``tx(ratio, key, values=None) -> optax.GradientTransformation``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from tna_jax import models
      >>> from tna_jax.config import default_config
      >>> net = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> c = default_config()
      >>> tx = make_transform(optax.sgd(0.1), c, net, arms_from_config(c))  # vanilla and TNA-PFN 0.4
      >>> params = {"w": jnp.zeros((10, 10))}
      >>> mask = find_mask(tx(0.4, jax.random.key(0)).init(params))
      >>> mask["w"].dtype, round(float(mask["w"].mean()), 2)  # each entry an anchor with probability 0.4
      (dtype('bool'), 0.46)
    """
    if not any(a.ratio > 0 for a in arms):
        return lambda ratio, key, values=None: base
    refresh = config.anchor.refresh_every or None
    opts = anchor_options(config, net)

    def tx(ratio, key, values=None):
        return optax.chain(base, anchors.fixed_anchor_mask(ratio, key, values=values, refresh_every=refresh, **opts))

    return tx


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
    """The anchor mask held in an optimizer state, or None when it has no ``fixed_anchor_mask``."""
    state = anchors.find_state(opt_state)
    return None if state is None else state.mask


def mask_of(state: TrainState) -> PyTree | None:
    """The anchor mask of a train state (see :func:`find_mask`)."""
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


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with integer labels (and optional label smoothing).

    Args:
      logits: ``(..., classes)`` logits (computed in float32).
      labels: integer labels of shape ``logits.shape[:-1]``.
      label_smoothing: the smoothing factor in [0, 1).

    Returns:
      The per-example losses, shape ``labels.shape``.

    Examples:
      >>> import jax.numpy as jnp
      >>> [round(float(v), 4) for v in cross_entropy(jnp.array([[0.0, 0.0], [10.0, 0.0]]), jnp.array([0, 0]))]
      [0.6931, 0.0]
    """
    logits = logits.astype(jnp.float32)
    if label_smoothing:
        targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits, targets)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


class ChunkMetrics(NamedTuple):
    """Per-run sums over the steps of one call (host code aggregates them into epoch means)."""

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

            (loss, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
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


RUN_AXES = ("vmap", "loop")

# At most this many runs per device are traced into one looped program; more runs are trained
# by the same program in groups, one call per group. Compile time grows faster than linearly
# with the step copies in one program (ResNet-20 on CPU: 8 copies 26 s, 16 copies over 2 min).
MAX_LOOPED_RUNS = 4


def loop_group_size(runs_per_device: int, max_runs: int = MAX_LOOPED_RUNS) -> int:
    """Runs per device in one looped program: the largest divisor of `runs_per_device` that is at
    most `max_runs` (so every group has the same shape and the program compiles once).

    Args:
      runs_per_device: runs each device holds.
      max_runs: the cap (:data:`MAX_LOOPED_RUNS`).

    Returns:
      The group size, in ``[1, max_runs]``.

    Examples:
      >>> loop_group_size(3), loop_group_size(8), loop_group_size(10), loop_group_size(7)
      (3, 4, 2, 1)
    """
    n = max(1, int(runs_per_device))
    return next(d for d in range(min(n, max(1, int(max_runs))), 0, -1) if n % d == 0)


class RunGroups:
    """A looped train-chunk program applied to groups of runs, one call per group.

    Each device holds ``n / devices`` runs; when that is more than ``max_runs``, every call cuts
    each device's block into groups of :func:`loop_group_size` runs (local slices, no
    communication), runs the one compiled `program` on each group and joins the results in the
    original order. The numbers are those of one call over all runs (each run's computation is
    the same); only the program size, and so the compile time, is bounded.

    Args:
      program: the jitted looped function (``loop_over_runs`` of one run's chunk).
      num_mapped: its leading arguments that carry the run axis.
      mesh: the run mesh, or None (one device).
      max_runs: runs per device in one call of `program`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> double = jax.jit(loop_over_runs(lambda w, s: (w * s, w.sum()), num_mapped=1))
      >>> groups = RunGroups(double, num_mapped=1, max_runs=2)
      >>> out, sums = groups(jnp.arange(12.0).reshape(6, 2), 2.0)  # 6 runs: 3 groups of 2
      >>> out[:, 0].tolist(), sums.tolist()
      ([0.0, 4.0, 8.0, 12.0, 16.0, 20.0], [1.0, 5.0, 9.0, 13.0, 17.0, 21.0])
    """

    def __init__(self, program: Callable[..., Any], num_mapped: int, mesh: Mesh | None = None,
                 max_runs: int = MAX_LOOPED_RUNS):
        self.program, self.num_mapped, self.max_runs = program, int(num_mapped), int(max_runs)
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        self.lower = program.lower  # for a call that needs no groups (see group_size)

    def group_size(self, num_runs: int) -> int | None:
        """Runs per device per call, or None when all runs fit in one call."""
        local = num_runs // (self.mesh.size if self.mesh is not None else 1)
        return None if local <= self.max_runs else loop_group_size(local, self.max_runs)

    def __call__(self, *args):
        mapped, shared = args[:self.num_mapped], args[self.num_mapped:]
        n = int(jax.tree.leaves(mapped)[0].shape[0])
        size = self.group_size(n)
        if size is None:
            return self.program(*args)
        local = n // (self.mesh.size if self.mesh is not None else 1)
        take, join = _group_programs(self.mesh, size)
        outs = [self.program(*take(mapped, jnp.int32(g)), *shared) for g in range(local // size)]
        return join(outs)


@functools.lru_cache(maxsize=16)
def _group_programs(mesh: Mesh | None, size: int):
    """Jitted ``take(tree, g)`` (each device's runs ``[g*size, (g+1)*size)``) and ``join(parts)``."""

    def take(tree, g):
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, g * size, size, axis=0), tree)

    def join(parts):
        return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)

    if mesh is not None:  # per device: slices and joins of its own block only
        spec = PartitionSpec("runs")
        take = jax.shard_map(take, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=spec, check_vma=False)
        join = jax.shard_map(join, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    return jax.jit(take), jax.jit(join)


def loop_over_runs(fn: Callable[..., Any], num_mapped: int, mesh: Mesh | None = None, *,
                   unrolled: bool = True) -> Callable[..., Any]:
    """``fn`` mapped over the leading (run) axis of its first `num_mapped` arguments by a loop,
    the other arguments passed to every run.

    This is ``jax.vmap(fn, in_axes=(0,) * num_mapped + (None,) * rest)`` with the same results,
    for the case where batching is slower than repeating (convolutions on XLA:CPU). `unrolled`
    traces one copy of ``fn`` per run (a Python loop: needed for convolution gradients, which
    XLA:CPU runs ~30x slower inside a ``while`` loop); False is a ``lax.map`` (one copy, fast
    compiles; fine for forward passes). With a `mesh` of more than one device it is a
    ``shard_map`` over the ``"runs"`` axis: each device loops over its own block of runs, and the
    shared arguments are replicated.

    Args:
      fn: the function of one run.
      num_mapped: how many leading arguments carry the run axis.
      mesh: the run mesh (:func:`run_mesh`), or None for one device.
      unrolled: one traced copy per run (True) or a ``lax.map`` (False).

    Returns:
      The mapped function, to be jitted by the caller.

    Examples:
      >>> import jax.numpy as jnp
      >>> f = loop_over_runs(lambda w, x: w * x, num_mapped=1)
      >>> f(jnp.arange(3.0), 2.0).tolist()
      [0.0, 2.0, 4.0]
    """

    def looped(*args):
        mapped, shared = args[:num_mapped], args[num_mapped:]
        if not unrolled:
            return jax.lax.map(lambda m: fn(*m, *shared), mapped)
        n = jax.tree.leaves(mapped)[0].shape[0]
        outs = [fn(*jax.tree.map(lambda a, r=r: a[r], mapped), *shared) for r in range(n)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    if mesh is None or mesh.size == 1:
        return looped

    def sharded(*args):
        in_specs = (PartitionSpec("runs"),) * num_mapped + (PartitionSpec(),) * (len(args) - num_mapped)
        return jax.shard_map(looped, mesh=mesh, in_specs=in_specs, out_specs=PartitionSpec("runs"),
                             check_vma=False)(*args)

    return sharded


def run_axis_plan(net: Net, backend: str | None = None) -> str:
    """``"loop"`` on CPU for a network with overlapping convolutions, else ``"vmap"`` (see
    :func:`make_train_epoch`).

    Measured on this 2-core CPU (``benchmarks/resnet20.py``): 4 ResNet-20 seeds vmapped train
    about 10x slower than looped in one program. A convolution whose kernel equals its stride
    (a ViT's patch embedding) is a matmul in disguise and vmaps well: looping a small ViT's 12
    fine-tuning runs took 43 s against 9 s vmapped (compilation of 12 copies). On GPU and TPU,
    vmap is the fast path.

    Args:
      net: the model.
      backend: ``"cpu"``, ``"gpu"``, ``"tpu"`` (default: JAX's default backend).

    Returns:
      ``"loop"`` or ``"vmap"``, a `run_axis` for :func:`make_train_epoch`.

    Examples:
      >>> from tna_jax import models
      >>> cnn = models.build({"name": "cnn", "width": 0.25, "hidden": 8}, (8, 8, 1), 10)
      >>> mlp = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> run_axis_plan(cnn, "cpu"), run_axis_plan(cnn, "gpu"), run_axis_plan(mlp, "cpu")
      ('loop', 'vmap', 'vmap')
    """
    return "loop" if (backend or jax.default_backend()) == "cpu" and any(_convolutions(net)) else "vmap"


AUTO_UNROLL_STEPS = 8


@functools.lru_cache(maxsize=64)
def _convolutions(net: Net) -> tuple[bool, ...]:
    """One entry per convolution in the forward pass (read off its jaxpr): whether its windows
    overlap (a kernel larger than its stride in some spatial dimension). A ViT's patch embedding
    (kernel = stride) does not: it is a matmul on reshaped patches."""
    variables = jax.eval_shape(net.init, jax.random.key(0))
    x = jax.ShapeDtypeStruct((1, *net.input_shape), net.input_dtype)
    jaxpr = jax.make_jaxpr(lambda v, x: net.apply(v, x)[0])(variables, x).jaxpr
    found: list[bool] = []

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape
                window = [rhs[d] for d in eqn.params["dimension_numbers"].rhs_spec[2:]]
                found.append(any(k > s for k, s in zip(window, eqn.params["window_strides"])))
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)
                if hasattr(inner, "eqns"):
                    walk(inner)

    walk(jaxpr)
    return tuple(found)


def uses_convolutions(net: Net) -> bool:
    """Whether the network's forward pass contains a convolution (read off its jaxpr)."""
    return bool(_convolutions(net))


def loop_plan(net: Net, steps_per_epoch_: int, steps_per_call: int = 0, unroll: int = 0,
              backend: str | None = None, runs_per_device: int = 1) -> tuple[int, int | bool]:
    """``(steps per jitted call, scan unroll)`` for :func:`make_train_epoch`.

    ``unroll=0`` is automatic: on CPU, a network with convolutions gets each call's steps
    completely unrolled, because XLA:CPU runs a convolution's gradient inside a ``while`` loop
    about 30x slower than outside one (measured: ``benchmarks/resnet20.py``, BENCHMARKS.md), and
    as many steps per call as the largest divisor of the epoch that is at most
    :data:`AUTO_UNROLL_STEPS`: every call then has the same length and the unrolled program
    compiles once (a shorter last call would compile a second one, which for an unrolled conv net
    costs as much as the first). Everything else keeps one rolled ``lax.scan`` over the call's
    steps (fast compiles, no dispatch per step). An explicit `unroll` (1 = rolled, k = unroll
    factor) and `steps_per_call` (0 = the whole epoch) win. When the runs are looped
    (:func:`run_axis_plan`), each device's program holds `runs_per_device` copies of every step,
    so the automatic chunk shrinks to keep at most :data:`AUTO_UNROLL_STEPS` step copies in one
    program (compile time grows with the copies: about 4.5 s each for ResNet-20 on this CPU).

    Examples:
      >>> from tna_jax import models
      >>> cnn = models.build({"name": "cnn", "width": 0.25, "hidden": 8}, (8, 8, 1), 10)
      >>> loop_plan(cnn, 20, backend="cpu"), loop_plan(cnn, 24, backend="cpu"), loop_plan(cnn, 20, backend="gpu")
      ((5, True), (8, True), (20, 1))
      >>> loop_plan(cnn, 20, backend="cpu", runs_per_device=2)  # 4 steps x 2 runs per program
      (4, True)
    """
    auto = unroll == 0 and (backend or jax.default_backend()) == "cpu" and uses_convolutions(net)
    if steps_per_call:
        chunk = int(steps_per_call)
    elif auto:
        cap = min(steps_per_epoch_, max(1, AUTO_UNROLL_STEPS // max(1, int(runs_per_device))))
        chunk = next(d for d in range(cap, 0, -1) if steps_per_epoch_ % d == 0)
    else:
        chunk = steps_per_epoch_
    return chunk, (True if auto else max(1, int(unroll)))


def resolve_run_axis(config: Any, net: Net) -> str:
    """``config.train.run_axis``, with ``"auto"`` decided by :func:`run_axis_plan`.

    Args:
      config: the experiment config (``train.run_axis``: ``"auto"``, ``"vmap"`` or ``"loop"``).
      net: the model.

    Returns:
      ``"vmap"`` or ``"loop"``.

    Examples:
      >>> from tna_jax import models
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> mlp = models.build({"name": "mlp", "depth": 1, "width": 8}, (4,), 3)
      >>> resolve_run_axis(c, mlp), c.train.run_axis
      ('vmap', 'auto')
      >>> c.train.run_axis = "loop"
      >>> resolve_run_axis(c, mlp)
      'loop'
    """
    choice = str(config.train.get("run_axis", "auto"))
    return run_axis_plan(net) if choice == "auto" else choice


def make_eval_fn(net: Net, batch_size: int = 1000) -> Callable[[PyTree, jax.Array, jax.Array], dict[str, jax.Array]]:
    """``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for ONE model over a whole split.

    Pure and jittable: it scans over batches of at most `batch_size` examples (padding is masked
    out), so ``jax.vmap`` over models, α or pairs composes with it. This is the evaluation every
    analysis in tna_jax uses (LMC paths, fusion, federated rounds).

    Args:
      net: the model.
      batch_size: the largest batch one evaluation step sees (memory, not the result).

    Returns:
      ``eval_fn(variables, x, y)`` returning the mean cross-entropy ``"loss"`` and the fraction
      ``"accuracy"`` of correctly classified examples (float32 scalars).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 0}, (4,), 3)  # a linear model
      >>> variables = {"params": {"head": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}}
      >>> eval_fn = jax.jit(make_eval_fn(net, batch_size=4))  # 10 examples: 3 batches, the last padded
      >>> out = eval_fn(variables, jnp.ones((10, 4)), jnp.zeros(10, jnp.int32))
      >>> round(float(out["loss"]), 4), float(out["accuracy"])  # uniform logits: loss log 3
      (1.0986, 1.0)
    """

    def eval_fn(variables: PyTree, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        n = x.shape[0]
        rows, valid = eval_indices(n, batch_size)
        rows, valid = jnp.asarray(rows), jnp.asarray(valid)

        def body(carry, inputs):
            loss_sum, correct_sum = carry
            idx, ok = inputs
            logits, _ = net.apply(variables, gather(x, idx), train=False)
            yb = gather(y, idx)
            loss = jnp.where(ok, cross_entropy(logits, yb), 0.0)
            correct = jnp.where(ok, jnp.argmax(logits, -1) == yb, False)
            return (loss_sum + loss.sum(), correct_sum + correct.sum()), None

        (loss_sum, correct_sum), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros((), jnp.int32)), (rows, valid))
        return {"loss": loss_sum / n, "accuracy": correct_sum / n}

    return eval_fn


@functools.lru_cache(maxsize=32)
def _batched_eval(net: Net, batch_size: int, run_axis: str, mesh: Mesh | None):
    eval_fn = make_eval_fn(net, batch_size)
    if run_axis == "vmap":
        return jax.jit(jax.vmap(eval_fn, in_axes=(0, None, None)))
    return jax.jit(loop_over_runs(eval_fn, 1, mesh, unrolled=False))


def _run_mesh_of(tree: PyTree) -> Mesh | None:
    """The mesh a run-sharded tree lives on (None when it is not split over several devices)."""
    sharding = getattr(jax.tree.leaves(tree)[0], "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 and tuple(sharding.spec)[:1] == ("runs",):
        return sharding.mesh
    return None


def evaluate_runs(net: Net, state: TrainState, x: jax.Array, y: jax.Array, batch_size: int = 1000) -> dict[str, np.ndarray]:
    """Loss and accuracy of every run on (x, y), in one call; NumPy arrays of shape (runs,).

    The jitted, vmapped :func:`make_eval_fn` is cached per ``(net, batch_size)``, so repeated
    evaluations (every epoch) compile once. Convolutional nets on CPU map the runs with a
    ``lax.map`` (per device, when the runs are sharded) instead: XLA:CPU's batched convolutions
    are several times slower (:func:`run_axis_plan`).

    Args:
      net: the model.
      state: the runs' state (leading run axis).
      x, y: one split's inputs and int labels (shared by every run).
      batch_size: evaluation batch size.

    Returns:
      ``{"loss": (runs,), "accuracy": (runs,)}`` as NumPy arrays.

    Examples:
      >>> import jax.numpy as jnp
      >>> from tna_jax import models
      >>> net = models.build({"name": "mlp", "depth": 0}, (4,), 3)
      >>> head = {"kernel": jnp.zeros((2, 4, 3)), "bias": jnp.array([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0]])}
      >>> state = TrainState({"head": head}, {}, (), jnp.zeros(2, jnp.int32))  # two runs
      >>> evaluate_runs(net, state, jnp.ones((6, 4)), jnp.zeros(6, jnp.int32))["accuracy"]
      array([1., 0.], dtype=float32)
    """
    variables = state.variables()
    out = _batched_eval(net, batch_size, run_axis_plan(net), _run_mesh_of(variables))(variables, x, y)
    return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# Sharding.
# ---------------------------------------------------------------------------------------------


def run_mesh(devices: Sequence[Any] | None = None) -> Mesh:
    """A 1-D mesh named "runs" over `devices` (default: all devices).

    Args:
      devices: the devices (default ``jax.devices()``).

    Returns:
      A ``jax.sharding.Mesh`` with one axis, ``"runs"``.

    Examples:
      >>> import jax
      >>> mesh = run_mesh()
      >>> mesh.axis_names, mesh.devices.size == jax.device_count()
      (('runs',), True)
    """
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.array(devices), ("runs",))


def shard_runs(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf with its leading (run) axis split over the mesh.

    Args:
      tree: a pytree whose leaves have the run axis first (its length a multiple of the mesh size).
      mesh: the mesh (:func:`run_mesh`).

    Returns:
      The tree placed with ``NamedSharding(mesh, PartitionSpec("runs"))``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> x = shard_runs({"w": jnp.zeros((jax.device_count() * 2, 3))}, run_mesh())["w"]
      >>> tuple(x.sharding.spec)
      ('runs',)
    """
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec("runs")))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def padded_runs(runs: Sequence[Run], num_devices: int) -> list[Run]:
    """`runs` padded (with copies of the last run) to a multiple of `num_devices`."""
    runs = list(runs)
    pad = (-len(runs)) % num_devices
    return runs + [dataclasses.replace(runs[-1], index=len(runs) + i) for i in range(pad)]


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


def device_memory_bytes(devices: Sequence[Any]) -> int | None:
    """Memory of `devices` together: accelerators report theirs; CPU devices share the host's RAM
    (counted once). None when unknown.

    Example:
      >>> device_memory_bytes(jax.devices()) > 2**20
      True
    """
    total, host = 0, False
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if stats and stats.get("bytes_limit"):
            total += int(stats["bytes_limit"])
        elif d.platform == "cpu":
            host = True
        else:
            return None
    if host:
        try:
            total += os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return total or None


def check_fits_in_memory(abstract_state: PyTree, devices: Sequence[Any], num_runs: int) -> None:
    """Refuses a training state larger than the devices' memory, before anything is allocated
    (a huge width or depth would otherwise end in an out-of-memory kill, not an error).

    Raises:
      ValueError: naming the state size, the memory and the fields that size it.

    Example:
      >>> huge = {"w": jax.ShapeDtypeStruct((1 << 22, 1 << 22), jnp.float32)}  # 64 TiB
      >>> check_fits_in_memory(huge, jax.devices(), 1)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: the training state of 1 runs needs 65536.0 GiB ...
    """
    need = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(abstract_state))
    have = device_memory_bytes(devices)
    if have is not None and need > have:
        raise ValueError(f"the training state of {num_runs} runs needs {need / 2**30:.1f} GiB (parameters and "
                         f"optimizer state), more than the {have / 2**30:.1f} GiB of memory of {len(devices)} "
                         "device(s); lower config.model.width / depth, config.num_seeds or the number of arms.")


def _slice_runs(tree: PyTree, n: int) -> PyTree:
    return jax.tree.map(lambda x: x[:n], tree)


def fit(config: Any, net: Net, dataset: Any, *, workdir: str | None = None,
        augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
        devices: Sequence[Any] | None = None, log: Callable[[str], None] = print,
        on_epoch: Callable[[int, dict[str, Any]], None] | None = None) -> TrainResult:
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

    checkpointer = None
    start_epoch, start_step, partial = 0, 0, None
    state = None
    if workdir:
        scheme = anchors.MASK_SCHEME if any(a.ratio > 0 for a in arms) else None
        checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                                             mask_scheme=scheme)
        if checkpointer.latest_step() is not None:
            state, _, meta = checkpointer.restore(abstract_state)
            start_epoch, start_step = int(meta["epoch"]), int(meta.get("step_in_epoch", 0))
            partial = meta.get("partial_sums")
            checkpointer.delete_after(start_epoch * spe + start_step)
            where = f"epoch {start_epoch}" + (f", step {start_step} of epoch {start_epoch + 1}" if start_step else "")
            log(f"resuming from the checkpoint of {where} in {checkpointer.directory}")
    metrics_log = logs.MetricsLog(workdir, [r.describe() for r in runs], start_epoch,
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
        if checkpointer is None:
            return
        point = f"{epoch}" if not step_in_epoch else f"{epoch}.{step_in_epoch}"
        faults.point(f"before_save:{point}")
        mask = mask_of(state)
        meta = {"epoch": epoch, "step_in_epoch": step_in_epoch, "steps_per_epoch": spe,
                "runs": [r.describe() for r in runs], "num_padded_runs": len(all_runs) - n_real}
        if sums is not None:
            meta["partial_sums"] = {k: v.tolist() for k, v in sums.items()}
        with faults.during(f"during_save:{point}", checkpointer.directory):
            checkpointer.save(epoch * spe + step_in_epoch, state, extras=None if mask is None else {"mask": mask},
                              meta=meta)
        faults.point(f"after_save:{point}")

    def diverged(m: Any, epoch: int) -> None:
        bad = [i for i in range(n_real) if m.first_nonfinite_step[i] >= 0]
        if not bad:
            return
        i = bad[0]
        run = runs[i]
        raise TrainingDiverged(
            f"training diverged: run {i} ({run.arm.label}, seed {run.seed}) had loss "
            f"{float(m.nonfinite_loss[i])} at epoch {epoch + 1}, step {int(m.first_nonfinite_step[i]) + 1} "
            f"of {spe}" + (f" ({len(bad)} runs diverged)" if len(bad) > 1 else "")
            + f". Lower config.optimizer.learning_rate (now {config.optimizer.learning_rate})"
            + (f"; the last good checkpoint in {checkpointer.directory} is kept." if checkpointer else "."))

    bar = None
    if config.train.progress and epochs > start_epoch:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, initial=start_epoch, desc=f"{len(runs)} runs", unit="epoch", dynamic_ncols=True)
    setup_seconds = time.time() - t_setup
    t0 = time.time()
    stop = StopSignal()
    try:
        for epoch in range(start_epoch, epochs):
            step_in_epoch = start_step if epoch == start_epoch else 0
            if epoch == start_epoch and partial:
                sums = {k: np.asarray(v, np.float64) for k, v in partial.items()}
            else:
                sums = {k: np.zeros(len(all_runs), np.float64) for k in ("loss_sum", "correct", "steps")}
            while step_in_epoch < spe:
                n = min(chunk, spe - step_in_epoch)
                state, m = train_chunk(n)(state, keys.data, keys.dropout, epoch, step_in_epoch,
                                          data.x_train, data.y_train)
                m = jax.device_get(m)
                diverged(m, epoch)
                sums["loss_sum"] += m.loss_sum
                sums["correct"] += m.correct
                sums["steps"] += m.steps
                step_in_epoch += n
                faults.point(f"chunk_end:{epoch}.{step_in_epoch}")
                if stop.signal is not None and step_in_epoch < spe:
                    save(epoch, step_in_epoch, sums)
                    raise Preempted(stop.message(epoch, step_in_epoch, spe, checkpointer))
            done = epoch + 1
            val = None
            if done % config.train.eval_every == 0 or done == epochs:
                val = evaluate_runs(net, state, data.x_val, data.y_val, config.train.eval_batch_size) \
                    if data.x_val.shape[0] else None
            rows = []
            for i, run in enumerate(runs):
                row = {"epoch": done, **run.describe(), "train_loss": float(sums["loss_sum"][i] / sums["steps"][i]),
                       "train_accuracy": float(sums["correct"][i] / (sums["steps"][i] * bs))}
                if val is not None:
                    row["val_loss"] = float(val["loss"][i])
                    row["val_accuracy"] = float(val["accuracy"][i])
                rows.append(row)
            metrics_log.write(rows)
            faults.point(f"epoch_end:{done}")
            if on_epoch is not None:
                on_epoch(done, {"rows": rows})
            if done % config.train.checkpoint_every == 0 or done == epochs or stop.signal is not None:
                save(done)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(_postfix(rows, arms, val is not None), refresh=False)
            if stop.signal is not None and done < epochs:
                raise Preempted(stop.message(done, 0, spe, checkpointer))
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        metrics_log.close()
        if checkpointer is not None:
            checkpointer.close()
    seconds = time.time() - t0
    test = evaluate_runs(net, state, data.x_test, data.y_test, config.train.eval_batch_size)
    val = evaluate_runs(net, state, data.x_val, data.y_val, config.train.eval_batch_size) \
        if data.x_val.shape[0] else {"loss": np.full(len(all_runs), np.nan), "accuracy": np.full(len(all_runs), np.nan)}
    real_state = _slice_runs(state, n_real)
    mask = mask_of(real_state)
    log(f"trained {n_real} runs x {epochs - start_epoch} epochs in {seconds:.1f}s (set-up {setup_seconds:.1f}s, "
        f"{len(devices)} device(s))")
    return TrainResult(state=real_state, runs=list(runs), history=metrics_log.rows,
                       test={k: v[:n_real] for k, v in test.items()}, val={k: v[:n_real] for k, v in val.items()},
                       mask=mask, seconds=seconds, resumed_from=start_epoch)


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
    final test metrics, and the mean validation accuracy (None without a validation split)."""
    from tna_jax.experiment import mean_std

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
