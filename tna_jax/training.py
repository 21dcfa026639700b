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

The compiled program (the state, its initialisation, the jitted chunk of steps) lives in
`tna_jax.epoch`; this module drives it: `fit` and what it returns.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tna_jax import anchors, distributed, logs
from tna_jax import checkpoint as ckpt_lib
from tna_jax.data import DeviceData
from tna_jax.data.batching import steps_per_epoch
from tna_jax.epoch import ChunkMetrics, TrainState, find_mask, init_runs, make_train_epoch, mask_of
from tna_jax.evaluation import evaluate_runs
from tna_jax.harness import Loop, Preempted, StopSignal, TrainingDiverged, resume
from tna_jax.models import Net
from tna_jax.optimizers import make_optimizer, make_transform
from tna_jax.run_axis import loop_group_size, loop_plan, resolve_run_axis
from tna_jax.runs import Arm, Run, RunKeys, arms_from_config, make_run_keys, make_runs, padded_runs
from tna_jax.sharding import check_fits_in_memory, replicate, run_mesh, shard_runs

PyTree = Any

# TrainState, ChunkMetrics, init_runs, make_train_epoch, find_mask and mask_of live in
# tna_jax.epoch; they are exported here too, where users have always imported them.
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


class _Setup(NamedTuple):
    """What `fit` trains, where and on what: everything built before the first step."""

    runs: list[Run]  # the real runs, in run-axis order
    arms: list[Arm]
    devices: list[Any]
    mesh: Mesh
    all_runs: list[Run]  # the runs padded to a multiple of the devices
    data: DeviceData
    batch_size: int
    steps_per_epoch: int
    epochs: int
    tx_factory: Callable[..., optax.GradientTransformation]
    update_tx: optax.GradientTransformation
    keys: RunKeys
    init_fn: Callable[[RunKeys], TrainState]
    abstract_state: TrainState


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
    t_setup = time.time()
    s = _set_up(config, net, dataset, devices)
    checkpointer, state, meta = _open_checkpoints(workdir, config, s.arms, s.abstract_state, s.steps_per_epoch, log)
    start_epoch, start_step = int(meta.get("epoch", 0)), int(meta.get("step_in_epoch", 0))
    partial = meta.get("partial_sums")
    # Several processes: process 0 writes the metrics and logs; all take part in the checkpoints.
    primary = distributed.is_primary()
    if not primary:
        log = _silent
    metrics_log = logs.MetricsLog(workdir if primary else None, [r.describe() for r in s.runs], start_epoch,
                                  tensorboard=config.train.tensorboard)
    if state is None:
        state = s.init_fn(s.keys)
    programs = _ChunkPrograms(config, net, s, augment)

    def save(state: TrainState, epoch: int, step_in_epoch: int = 0, sums: dict[str, np.ndarray] | None = None):
        _save(checkpointer, s, state, epoch, step_in_epoch, sums)

    setup_seconds = time.time() - t_setup
    t0 = time.time()
    with Loop(s.epochs, start=start_epoch, unit="epoch", checkpointer=checkpointer,
              checkpoint_every=config.train.checkpoint_every, metrics=metrics_log,
              progress=config.train.progress and primary, desc=f"{len(s.runs)} runs", hooks=hooks,
              agree=distributed.any_process) as loop:
        for epoch in loop.iterations():
            resuming = epoch == start_epoch
            state, sums = _train_epoch(loop, s, programs, state, epoch, start_step if resuming else 0,
                                       partial if resuming else None, config.optimizer.learning_rate, save)
            _end_epoch(loop, config, net, s, state, epoch + 1, sums, on_epoch, save)
    seconds = time.time() - t0
    log(f"trained {len(s.runs)} runs x {s.epochs - start_epoch} epochs in {seconds:.1f}s (set-up "
        f"{setup_seconds:.1f}s, {len(s.devices)} device(s))")
    return _result(config, net, s, state, metrics_log.rows, seconds, start_epoch)


def _set_up(config: Any, net: Net, dataset: Any, devices: Sequence[Any] | None) -> _Setup:
    """The runs and their keys, the device mesh, the data on it, the optimizer, and the jitted
    initialisation with the abstract state it produces (checked to fit in device memory)."""
    from tna_jax.data import to_device

    runs = make_runs(config)
    arms = arms_from_config(config)
    devices = list(devices) if devices is not None else jax.devices()
    mesh = run_mesh(devices)
    all_runs = padded_runs(runs, len(devices))

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
    return _Setup(runs, arms, devices, mesh, all_runs, data, bs, spe, epochs, tx_factory, update_tx, keys, init_fn,
                  abstract_state)


class _ChunkPrograms:
    """The jitted chunk of `num_steps` steps (`make_train_epoch`), built on first use and kept:
    an epoch takes chunks of `chunk` steps and a shorter last one (and a resumed epoch its rest)."""

    def __init__(self, config: Any, net: Net, setup: _Setup,
                 augment: Callable[[jax.Array, jax.Array], jax.Array] | None):
        run_axis = resolve_run_axis(config, net)
        per_device = loop_group_size(len(setup.all_runs) // setup.mesh.size) if run_axis == "loop" else 1
        self.chunk, unroll = loop_plan(net, setup.steps_per_epoch, int(config.train.steps_per_call),
                                       int(config.train.unroll), runs_per_device=per_device)
        self._build = lambda num_steps: make_train_epoch(  # noqa: E731
            net, setup.update_tx, num_train=int(setup.data.x_train.shape[0]), batch_size=setup.batch_size,
            augment=augment, label_smoothing=float(config.train.label_smoothing), num_steps=num_steps,
            unroll=unroll, run_axis=run_axis, mesh=setup.mesh)
        self._built: dict[int, Any] = {}

    def __call__(self, num_steps: int) -> Any:
        if num_steps not in self._built:
            self._built[num_steps] = self._build(num_steps)
        return self._built[num_steps]


def _train_epoch(loop: Loop, s: _Setup, programs: _ChunkPrograms, state: TrainState, epoch: int,
                 step_in_epoch: int, partial: dict[str, Any] | None, learning_rate: float,
                 save: Callable[..., None]) -> tuple[TrainState, dict[str, np.ndarray]]:
    """Trains every run through epoch `epoch` from step `step_in_epoch` (`partial`: the sums of
    the steps before it), one jitted call per chunk. Returns the state and the epoch's per-run
    sums; at a stop request between chunks, checkpoints the partial epoch and raises Preempted."""
    spe = s.steps_per_epoch
    if partial:
        sums = {k: np.asarray(v, np.float64) for k, v in partial.items()}
    else:
        sums = {k: np.zeros(len(s.all_runs), np.float64) for k in ("loss_sum", "correct", "steps")}
    while step_in_epoch < spe:
        n = min(programs.chunk, spe - step_in_epoch)
        state, m = programs(n)(state, s.keys.data, s.keys.dropout, epoch, step_in_epoch,
                               s.data.x_train, s.data.y_train)
        m = distributed.to_host(m)  # the runs of every process
        _check_finite(loop, m, s.runs, epoch, spe, learning_rate)
        for k in sums:
            sums[k] += getattr(m, k)
        step_in_epoch += n
        loop.point(f"chunk_end:{epoch}.{step_in_epoch}")
        # A signal to one process stops every process at the same step boundary.
        if distributed.any_process(loop.stop_requested) and step_in_epoch < spe:
            loop.save(f"{epoch}.{step_in_epoch}",
                      lambda x=state, e=epoch, i=step_in_epoch, t=sums: save(x, e, i, t))
            raise loop.preempted(f"at step {step_in_epoch} of {spe} in epoch {epoch + 1}")
    return state, sums


def _end_epoch(loop: Loop, config: Any, net: Net, s: _Setup, state: TrainState, done: int,
               sums: dict[str, np.ndarray], on_epoch: Callable[[int, dict[str, Any]], None] | None,
               save: Callable[..., None]) -> None:
    """After epoch `done`: validation (on the cadence), the metrics rows, the caller's `on_epoch`,
    and the loop's checkpoint and stop check."""
    val = None
    if (done % config.train.eval_every == 0 or done == s.epochs) and s.data.x_val.shape[0]:
        val = evaluate_runs(net, state, (s.data.x_val, s.data.y_val), batch_size=config.train.eval_batch_size)
    rows = _epoch_rows(s.runs, done, sums, s.batch_size, val)
    loop.log(rows)
    loop.point(f"epoch_end:{done}")
    if on_epoch is not None:
        on_epoch(done, {"rows": rows})
    loop.end_iteration(done, lambda: save(state, done), postfix=_postfix(rows, s.arms, val is not None),
                       where=f"after epoch {done}")


def _save(checkpointer: Any, s: _Setup, state: TrainState, epoch: int, step_in_epoch: int = 0,
          sums: dict[str, np.ndarray] | None = None) -> None:
    """Checkpoints `state` (numbered by optimizer step) with the anchor mask beside it; `sums`:
    the per-run sums of a partial epoch."""
    mask = mask_of(state)
    meta = {"epoch": epoch, "step_in_epoch": step_in_epoch, "steps_per_epoch": s.steps_per_epoch,
            "runs": [r.describe() for r in s.runs], "num_padded_runs": len(s.all_runs) - len(s.runs)}
    if sums is not None:
        meta["partial_sums"] = {k: v.tolist() for k, v in sums.items()}
    checkpointer.save(epoch * s.steps_per_epoch + step_in_epoch, state,
                      extras=None if mask is None else {"mask": mask}, meta=meta)


def _result(config: Any, net: Net, s: _Setup, state: TrainState, history: list[dict[str, Any]], seconds: float,
            start_epoch: int) -> TrainResult:
    """The `TrainResult`: final test and validation metrics of the real runs (padding removed)."""
    n_real = len(s.runs)
    data, batch_size = s.data, config.train.eval_batch_size
    test = evaluate_runs(net, state, (data.x_test, data.y_test), batch_size=batch_size)._asdict()
    val = evaluate_runs(net, state, (data.x_val, data.y_val), batch_size=batch_size)._asdict() \
        if data.x_val.shape[0] else {"loss": np.full(len(s.all_runs), np.nan),
                                     "accuracy": np.full(len(s.all_runs), np.nan)}
    real_state = _slice_runs(state, n_real)
    return TrainResult(state=real_state, runs=list(s.runs), history=history,
                       test={k: v[:n_real] for k, v in test.items()}, val={k: v[:n_real] for k, v in val.items()},
                       mask=mask_of(real_state), seconds=seconds, resumed_from=start_epoch)


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
