"""``run(config, workdir)``: wires data, models, training and analysis together for ``train.py``
and notebooks. Holds no algorithm of its own.

A workdir gets ``config.json``, ``metrics.jsonl`` (one line per epoch and run), ``checkpoints/``
(orbax, with the anchor mask beside the state), ``report.json``, ``report.md`` and PNG plots.
It is locked while a run uses it (a second run on the same workdir fails at once; a lock left by
a killed process is taken over), and rerunning the same command resumes from the last good
checkpoint. ``config.kind`` picks the experiment: ``"train"`` (multi-seed training with LMC
analysis, the default) or a kind registered in :data:`EXPERIMENTS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from tna_jax import checkpoint as ckpt_lib
from tna_jax import chunking, evaluation, norm_stats
from tna_jax import config as config_lib

__all__ = [
    "run", "EXPERIMENTS", "register", "WorkdirLock", "WorkdirBusy", "prepare_workdir", "train_experiment",
    "Trained", "load_problem", "train_and_analyse", "write_report", "write_train_outputs", "analyse_lmc", "lmc_stats",
    "count_compiles", "markdown_table", "mean_std", "workdir_path", "choose_pairs", "statistics_note", "pm",
    "anchor_values_note",
]

EXPERIMENTS: dict[str, Callable[[Any, str | None], dict[str, Any]]] = {}


def register(kind: str):
    """Decorator adding an experiment kind: ``fn(config, workdir) -> report dict``.

    Args:
      kind: the ``config.kind`` value that selects the function.

    Returns:
      The decorator (it returns the function unchanged).

    Examples:
      >>> @register("test_doc_kind")
      ... def hello(config, workdir):
      ...     return {"kind": "test_doc_kind", "seeds": config.num_seeds}
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.kind = "test_doc_kind"
      >>> run(c)
      {'kind': 'test_doc_kind', 'seeds': 4}
    """

    def deco(fn):
        EXPERIMENTS[kind] = fn
        return fn

    return deco


class WorkdirBusy(RuntimeError):
    """Another live process is using the workdir."""


class WorkdirLock:
    """An exclusive ``flock`` on ``<workdir>/.lock``, released when the process ends however it ends.

    A second process fails at once with :class:`WorkdirBusy` naming the holder. A lock file left
    behind by a killed process carries no lock (the kernel dropped it), so it is simply taken
    over. The holder writes its pid, host and start time into the file and empties it on a
    clean release, so a non-empty file found on acquiring means the previous holder died
    holding it: that holder is kept in :attr:`previous_holder` (None after a clean release).

    Args:
      workdir: the directory to lock (created on :meth:`acquire`).

    Examples:
      >>> import tempfile
      >>> with WorkdirLock(tempfile.mkdtemp()) as lock:
      ...     lock.previous_holder is None
      True
      >>> workdir = tempfile.mkdtemp()
      >>> with WorkdirLock(workdir):
      ...     try:
      ...         WorkdirLock(workdir).acquire()
      ...     except WorkdirBusy as err:
      ...         print("busy:", "is in use by pid" in str(err))
      busy: True
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._fd: int | None = None
        self.previous_holder: dict[str, Any] | None = None

    def acquire(self) -> WorkdirLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}" if holder else "another process"
            raise WorkdirBusy(f"workdir {os.path.dirname(self.path)} is in use by {who}; wait for it to "
                              "finish or choose another --workdir.") from None
        self.previous_holder = self._read(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = os.read(fd, 4096)
            return json.loads(data) if data else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file = released cleanly (see previous_holder)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _normalise(obj: Any) -> Any:
    return json.loads(ckpt_lib.dumps(obj))


def config_dict(config: Any) -> dict[str, Any]:
    return _normalise(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def prepare_workdir(config: Any, workdir: str) -> None:
    """Writes ``config.json``, or checks it against the existing one when resuming.

    Args:
      config: the run's config.
      workdir: the run directory (created).

    Raises:
      ValueError: the workdir holds a run with a different config (the message lists the fields
        that differ; only fields in ``config.RESUME_SAFE_FIELDS`` may change on resume; a field
        of ``config.ADDED_FIELDS`` missing from an older ``config.json`` counts as its default).
      tna_jax.config.ConfigError: ``train.epochs`` changed under a schedule that depends on the
        total number of steps (``config.EPOCH_DEPENDENT_SCHEDULES``): the steps already done were
        taken with another learning rate, so the resumed run would be neither run. Nothing is
        written then.

    Examples:
      >>> import os, tempfile
      >>> from tna_jax.config import default_config
      >>> workdir = tempfile.mkdtemp()
      >>> prepare_workdir(default_config(), workdir)
      >>> os.listdir(workdir)
      ['config.json']
    """
    os.makedirs(workdir, exist_ok=True)
    ckpt_lib.remove_stale_temporaries(workdir)  # left by a writer killed before its rename
    path = os.path.join(workdir, "config.json")
    new = config_dict(config)
    if os.path.exists(path):
        try:
            old = ckpt_lib.read_json(path)
        except ValueError as err:
            raise ValueError(f"{path} is damaged ({err}); move the workdir aside or delete config.json "
                             "to start afresh.") from None
        flat_old, flat_new = config_lib.flatten(old), config_lib.flatten(new)
        for field, default in config_lib.ADDED_FIELDS.items():  # written before the field existed
            if field in flat_new and field not in flat_old and field.split(".")[0] in old:
                flat_old[field] = default
        differ = sorted(k for k in set(flat_old) | set(flat_new)
                        if flat_old.get(k) != flat_new.get(k)
                        and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in config_lib.RESUME_SAFE_FIELDS))
        has_ckpt = os.path.isdir(os.path.join(workdir, "checkpoints")) and any(
            n.isdigit() for n in os.listdir(os.path.join(workdir, "checkpoints")))
        schedule = flat_new.get("optimizer.schedule")
        if has_ckpt and flat_old.get("train.epochs") != flat_new.get("train.epochs") \
                and schedule in config_lib.EPOCH_DEPENDENT_SCHEDULES and new.get("kind", "train") != "federated":
            raise config_lib.ConfigError(
                f"config.train.epochs changed from {flat_old.get('train.epochs')} to {flat_new.get('train.epochs')} "
                f"on resuming workdir {workdir}, but config.optimizer.schedule={schedule!r} decays over the total "
                "number of steps, so the resumed run would differ from a fresh run of either length; start a "
                "fresh --workdir, or train with optimizer.schedule='constant' to extend runs.")
        if differ and has_ckpt:
            shown = ", ".join(f"{k} (was {flat_old.get(k)!r}, now {flat_new.get(k)!r})" for k in differ[:6])
            raise ValueError(f"workdir {workdir} holds a run with a different config: {shown}"
                             + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
                             + ". Use another --workdir, or the same config to resume.")
    ckpt_lib.write_json(path, new)


def run(config: Any, workdir: str | None = None) -> dict[str, Any]:
    """Runs the experiment that `config` describes and returns its report (also written to
    ``<workdir>/report.json`` when a workdir is given).

    With a workdir, the workdir is locked for the run (:class:`WorkdirLock`) and its
    ``config.json`` written or checked (:func:`prepare_workdir`); a rerun resumes.

    Args:
      config: the experiment config; ``config.kind`` picks the function (``"train"`` by default).
      workdir: the run directory, or None to write nothing.

    Returns:
      The report dict of the experiment kind.

    Raises:
      tna_jax.config.ConfigError: an invalid config or an unknown kind.
      WorkdirBusy: another process holds the workdir.
      ValueError: the workdir holds a run with a different config.

    Examples:
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.kind = "no_such_kind"
      >>> try:
      ...     run(c)
      ... except ValueError as err:
      ...     print(str(err).startswith("config.kind must be one of"), "'train'" in str(err))
      True True
    """
    config_lib.validate(config)
    kind = config.get("kind", "train") if hasattr(config, "get") else "train"
    if kind not in EXPERIMENTS:
        _load_kinds()
    if kind not in EXPERIMENTS:
        raise config_lib.ConfigError(f"config.kind must be one of {sorted(EXPERIMENTS)}; got {kind!r}.")
    if jax.process_count() > 1:
        return _run_multiprocess(config, kind, workdir)
    if workdir is None:
        return EXPERIMENTS[kind](config, None)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir) as lock:
        if lock.previous_holder:
            h = lock.previous_holder
            print(f"workdir {workdir}: took over the lock of pid {h.get('pid')} on {h.get('host')} (since "
                  f"{h.get('started')}), which ended without releasing it; resuming from its checkpoints.")
        prepare_workdir(config, workdir)
        return EXPERIMENTS[kind](config, workdir)


# Kinds whose programs span several processes (jax.distributed): the federated rounds split the
# clients across processes. The other kinds shard over the devices of one process.
MULTIPROCESS_KINDS = ("federated",)


def is_primary() -> bool:
    """Whether this process writes the workdir's files (process 0; always true in one process)."""
    return jax.process_index() == 0


def _run_multiprocess(config: Any, kind: str, workdir: str | None) -> dict[str, Any]:
    """:func:`run` under ``jax.distributed``: every process runs the same program; process 0 holds
    the workdir lock and writes ``config.json``, metrics and reports, all processes take part in
    the orbax checkpoints (one shared directory, as orbax expects on several hosts)."""
    from jax.experimental import multihost_utils

    if kind not in MULTIPROCESS_KINDS:
        raise config_lib.ConfigError(
            f"config.kind={kind!r} runs in one process; {jax.process_count()} processes were started "
            f"(jax.distributed). Kinds that span processes: {list(MULTIPROCESS_KINDS)}.")
    if workdir is None:
        return EXPERIMENTS[kind](config, None)
    workdir = os.path.abspath(workdir)
    lock, error = None, None
    if is_primary():
        try:
            os.makedirs(workdir, exist_ok=True)
            lock = WorkdirLock(workdir).acquire()
            prepare_workdir(config, workdir)
        except Exception as err:  # every process must learn of it, or the others wait forever
            error = err
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok:
        if lock is not None:
            lock.release()
        if error is not None:
            raise error
        raise WorkdirBusy(f"process 0 could not prepare workdir {workdir} (its error says why); "
                          f"process {jax.process_index()} stops too.")
    try:
        return EXPERIMENTS[kind](config, workdir)
    finally:
        if lock is not None:
            lock.release()


def workdir_path(workdir: str, relative: str, field: str) -> str:
    """``<workdir>/<relative>``, refusing anything that would land outside the workdir.

    Experiment kinds use it for every path built from a config value (sub-run names, output
    files), so that a config cannot write outside its workdir: absolute paths, ``..``
    components and symbolic links leading out are rejected.

    Args:
      workdir: the run directory.
      relative: the path from the config.
      field: the config field it came from, for the message.

    Returns:
      The joined path.

    Raises:
      ConfigError: `relative` is empty, absolute, contains ``..`` or a NUL byte, or resolves
        outside `workdir`.

    Example:
      >>> workdir_path("/tmp/run", "ratio_0.4", "grid.variants")
      '/tmp/run/ratio_0.4'
    """
    config_lib.check_relative_path(field, relative)
    root = os.path.realpath(workdir)
    path = os.path.join(workdir, relative)
    resolved = os.path.realpath(path)
    if resolved != root and not resolved.startswith(root + os.sep):
        raise config_lib.ConfigError(f"config.{field}={relative!r} resolves to {resolved}, outside the workdir "
                                     f"{root} (a symbolic link?); use a plain relative path.")
    return path


def _load_kinds() -> None:
    """Imports the modules that register further experiment kinds."""
    import importlib

    for module in ("tna_jax.experiments",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


# ---------------------------------------------------------------------------------------------
# Pieces shared by the experiment kinds.
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def count_compiles():
    """Counts XLA compilations by function name while the block runs: ``{"jit(run_epoch)": 1}``.

    Uses ``jax.monitoring``'s backend-compile events (no log output). A sweep whose arms are
    one compiled program shows exactly one compile of the training step function.

    Yields:
      A dict ``{function name: compilations}`` filled while the block runs.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> with count_compiles() as compiles:
      ...     f = jax.jit(lambda x: x * 3.0 + 1.0)
      ...     _ = f(jnp.arange(7.0)), f(jnp.arange(7.0) + 1.0)
      >>> compiles["jit(<lambda>)"]
      1
    """
    counts: dict[str, int] = {}

    def listener(event: str, seconds: float, **kwargs: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            name = str(kwargs.get("fun_name", "?"))
            counts[name] = counts.get(name, 0) + 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def mean_std(values: Any) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (``ddof=1``, the unbiased variance's root).

    Every "± std" in tna_jax's reports is this one: over seeds, or over seed pairs (say which
    pairs, `tna_jax.lmc.describe_pairs`). With one value there is no spread to estimate, so
    the std is None (``null`` in JSON, no "±" in tables), and with none the mean is None too.

    Args:
      values: numbers.

    Returns:
      ``(mean, std)``: floats, or None where they are undefined.

    Examples:
      >>> mean_std([1.0, 3.0]), mean_std([2.0]), mean_std([])
      ((2.0, 1.4142135623730951), (2.0, None), (None, None))
    """
    arr = np.asarray(values, dtype=float).ravel()
    if not arr.size:
        return None, None
    return float(np.mean(arr)), (float(np.std(arr, ddof=1)) if arr.size >= 2 else None)


def choose_pairs(config: Any, n: int) -> tuple[list[tuple[int, int]], str]:
    """The seed pairs of an arm of n seeds that ``config.analysis`` asks for, and how to say so.

    Args:
      config: the experiment config (``analysis.pairs``, ``analysis.max_pairs``,
        ``analysis.pairs_seed``; absent fields take their defaults).
      n: the arm's seeds.

    Returns:
      ``(pairs, description)``: `tna_jax.lmc.select_pairs` and
      `tna_jax.lmc.describe_pairs` of them.

    Examples:
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.analysis.pairs = "disjoint"
      >>> choose_pairs(c, 10)
      ([(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)], '5 disjoint pairs')
    """
    from tna_jax import lmc

    a = config.analysis
    mode, seed = a.get("pairs", "all"), int(a.get("pairs_seed", 0))
    pairs = lmc.select_pairs(n, mode, int(a.max_pairs), seed)
    return pairs, lmc.describe_pairs(mode, len(pairs), n, seed)


def anchor_values_note(config: Any) -> str:
    """How anchored entries were initialised, for captions and tables.

    Args:
      config: the experiment config (``anchor.share_values``).

    Returns:
      ``"shared anchor values"`` (the same values in every seed, the paper's setting) or
      ``"per-model anchor values"``.

    Examples:
      >>> from tna_jax.config import default_config
      >>> anchor_values_note(default_config())
      'shared anchor values'
    """
    return "shared anchor values" if config.anchor.share_values else "per-model anchor values"


LMC_KEYS = ("loss_barrier", "accuracy_barrier", "avg_endpoint_accuracy", "interp_accuracy",
            "avg_endpoint_loss", "interp_loss")


def lmc_stats(eval_fn: Any, stacked: Any, x: Any, y: Any, *, pairs: list[tuple[int, int]], alphas: Any,
              chunk: int | None = None) -> dict[str, Any]:
    """Pairwise LMC of stacked models: ``<key>_mean``/``<key>_std`` (sample std, None for one pair;
    `mean_std`) over pairs for every key of `LMC_KEYS`, the per-pair barriers, the
    curves, and the fusion of all models.

    Args:
      eval_fn: ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one model
        (``evaluation.make_eval_fn``).
      stacked: the models' variables on a leading axis.
      x, y: the split the paths are evaluated on.
      pairs: the ``(i, j)`` index pairs (``lmc.all_pairs``).
      alphas: the interpolation coefficients.
      chunk: evaluate at most this many (pair, α) points at once (None: all).

    Returns:
      ``{"<key>_mean", "<key>_std" for key in LMC_KEYS, "per_pair": [...], "curve": {"alpha",
      "accuracy", "loss"} (lists, pairs x alphas), "fusion": lmc.fuse's numbers without the model}``.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):  # loss (w - 1)^2 - 1: convex, so no loss barrier; accuracy 1 near 0 and 2
      ...     loss = (v["w"] - 1.0) ** 2 - 1.0
      ...     return {"loss": loss, "accuracy": jnp.where(jnp.abs(loss) < 0.1, 1.0, 0.0)}
      >>> stats = lmc_stats(eval_fn, {"w": jnp.array([0.0, 2.0])}, jnp.zeros(1), jnp.zeros(1),
      ...                   pairs=[(0, 1)], alphas=jnp.linspace(0, 1, 3))
      >>> stats["accuracy_barrier_mean"], stats["loss_barrier_mean"], stats["curve"]["accuracy"]
      (1.0, 0.0, [[1.0, 0.0, 1.0]])
    """
    from tna_jax import lmc

    table = lmc.pairwise_barriers(eval_fn, stacked, (x, y), pairs=pairs, alphas=alphas, chunk=chunk)
    per_pair = table["per_pair"]
    out: dict[str, Any] = {}
    for key in LMC_KEYS:
        out[f"{key}_mean"], out[f"{key}_std"] = mean_std([p[key] for p in per_pair])
    out["per_pair"] = per_pair
    out["curve"] = {"alpha": table["paths"]["alpha"].tolist(), "accuracy": table["paths"]["accuracy"].tolist(),
                    "loss": table["paths"]["loss"].tolist()}
    fused = lmc.fuse(eval_fn, stacked, (x, y))
    out["fusion"] = {k: v for k, v in fused.items() if k != "fused"}
    return out


def bn_reset_eval(config: Any, net: Any, eval_fn: Any, data: Any) -> Any | None:
    """``eval_fn`` with BatchNorm statistics reset from training data (None for nets without
    BatchNorm or with ``analysis.bn_reset`` off). Uses the first ``analysis.bn_reset_examples``
    training examples (0 = all) in batches of ``train.batch_size`` (the training batch size)."""

    if not (config.analysis.bn_reset and net.has_batch_stats):
        return None
    n = int(config.analysis.bn_reset_examples) or int(data.x_train.shape[0])
    x_reset = data.x_train[: min(n, int(data.x_train.shape[0]))]
    return norm_stats.with_bn_reset(net, eval_fn, x_reset, batch_size=min(int(config.train.batch_size), int(x_reset.shape[0])))


def analyse_lmc(config: Any, net: Any, result: Any, data: Any) -> dict[str, Any]:
    """Pairwise LMC between the seeds of each arm, and the fusion of all seeds of each arm.

    For nets with BatchNorm (and ``analysis.bn_reset``, the default) every arm is reported both
    ways: with the interpolated running statistics (top level) and with the statistics reset
    from training data at every α (``"bn_reset"``; :func:`tna_jax.norm_stats.with_bn_reset`).

    Args:
      config: the experiment config (``analysis.*``: split, α count, pair cap, chunk, BN reset).
      net: the model.
      result: the :class:`tna_jax.training.TrainResult` of the runs.
      data: the dataset on the device (:class:`tna_jax.data.DeviceData`).

    Returns:
      ``{arm label: {"runs": [...], and for arms with 2+ seeds the `lmc_stats` numbers
      (means and sample stds over the pairs), "pairs" (run indices), "pairs_note" (how they were
      chosen: ``config.analysis.pairs``, `choose_pairs`) and, with BN reset, "bn_reset"}}``.

    Examples:
      An arm with one seed has no pair, so nothing is evaluated (:func:`lmc_stats` shows the
      numbers an arm with 2+ seeds gets):

      >>> import jax.numpy as jnp, numpy as np
      >>> from tna_jax import models, training
      >>> from tna_jax.config import default_config
      >>> from tna_jax.data import Dataset, to_device
      >>> net = models.build({"name": "mlp", "depth": 0}, (1,), 2)
      >>> runs = [runs_lib.Run(0, 0, runs_lib.Arm("none", 0.0), 0), runs_lib.Run(1, 1, runs_lib.Arm("anchor", 0.4), 0)]
      >>> head = {"kernel": jnp.zeros((2, 1, 2)), "bias": jnp.zeros((2, 2))}
      >>> state = training.TrainState({"head": head}, {}, (), jnp.zeros(2, jnp.int32))
      >>> result = training.TrainResult(state, runs, [], {}, {}, None, 0.0, 0)
      >>> x, y = np.zeros((4, 1), np.float32), np.array([0, 0, 1, 1], np.int32)
      >>> analyse_lmc(default_config(), net, result, to_device(Dataset("toy", x, y, x, y, x, y, 2), normalize=False))
      {'vanilla': {'runs': [0]}, 'TNA-PFN 0.4': {'runs': [1]}}
    """
    from tna_jax import lmc

    eval_fn = evaluation.make_eval_fn(net, config.train.eval_batch_size)
    reset_fn = bn_reset_eval(config, net, eval_fn, data)
    x, y = data.split(config.analysis.split)
    alphas = lmc.default_alphas(config.analysis.num_alphas)
    chunk = int(config.analysis.chunk) or chunking.AUTO
    out: dict[str, Any] = {}
    arms: dict[int, list[int]] = {}
    for r in result.runs:
        arms.setdefault(r.arm_index, []).append(r.index)
    for idx in arms.values():
        label = result.runs[idx[0]].arm.label
        stacked = jax.tree.map(lambda v, idx=idx: v[np.asarray(idx)], result.state.variables())
        entry: dict[str, Any] = {"runs": idx}
        pairs, note = choose_pairs(config, len(idx))
        if pairs:
            entry.update(lmc_stats(eval_fn, stacked, x, y, pairs=pairs, alphas=alphas, chunk=chunk))
            entry["pairs"] = [[idx[i], idx[j]] for i, j in pairs]
            entry["pairs_note"] = note
            if reset_fn is not None:
                entry["bn_reset"] = lmc_stats(reset_fn, stacked, x, y, pairs=pairs, alphas=alphas, chunk=chunk)
        out[label] = entry
    return out


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table: ``columns`` are ``(key, header)`` pairs.

    Args:
      rows: one dict per row (missing keys give empty cells).
      columns: ``(key, header)`` pairs in column order.

    Returns:
      The table as Markdown text.

    Examples:
      >>> print(markdown_table([{"arm": "vanilla", "acc": 0.5}], [("arm", "arm"), ("acc", "accuracy")]))
      | arm | accuracy |
      |---|---|
      | vanilla | 0.5 |
    """
    head = "| " + " | ".join(c[1] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(r.get(c[0], "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])



def pm(mean: float | None, std: float | None, scale: float = 100.0, digits: int = 1) -> str:
    """``"mean ± std"`` scaled (percent by default); the mean alone without a std (one value);
    "—" for a missing mean.

    Args:
      mean, std: the numbers (None or NaN: missing).
      scale: multiplies both (100: percent).
      digits: decimals.

    Returns:
      The text of a table cell.

    Examples:
      >>> pm(0.5, 0.01), pm(0.5, None), pm(None, None)
      ('50.0 ± 1.0', '50.0', '—')
    """
    if mean is None or not np.isfinite(mean):
        return "—"
    if std is None or not np.isfinite(std):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


SUMMARY_COLUMNS = [("arm", "arm"), ("seeds", "seeds"), ("acc", "test acc %"), ("avg", "Avg. Acc. %"),
                   ("interp", "Interp. Acc. % (α=0.5)"), ("abar", "acc. barrier %"),
                   ("lbar", "loss barrier"), ("fused", "all-seed fusion acc %")]


def summary_row(label: str, seeds: Any, acc: str, lm: dict[str, Any]) -> dict[str, Any]:
    fusion = lm.get("fusion", {})
    return {
        "arm": label, "seeds": seeds, "acc": acc,
        "avg": pm(lm.get("avg_endpoint_accuracy_mean"), lm.get("avg_endpoint_accuracy_std")),
        "interp": pm(lm.get("interp_accuracy_mean"), lm.get("interp_accuracy_std")),
        "abar": pm(lm.get("accuracy_barrier_mean"), lm.get("accuracy_barrier_std")),
        "lbar": pm(lm.get("loss_barrier_mean"), lm.get("loss_barrier_std"), scale=1.0, digits=3),
        "fused": f"{fusion['fused_accuracy'] * 100:.1f}" if fusion else "—",
    }


def statistics_note(report: dict[str, Any]) -> str:
    """The sentence under a train table saying what its "±" are.

    Args:
      report: a train report (``arms``, optional ``lmc`` with ``pairs_note``, and ``anchor_values``,
        said when an arm has anchors).

    Returns:
      E.g. ``"Test accuracy: mean ± sample std over 10 seeds. LMC columns: mean ± sample std over
      5 disjoint pairs of seeds per arm. Anchors: shared anchor values."``

    Examples:
      >>> statistics_note({"arms": [{"seeds": 4}], "lmc": {"vanilla": {"pairs_note": "2 disjoint pairs"}}})
      'Test accuracy: mean ± sample std over 4 seeds. LMC columns: mean ± sample std over 2 disjoint pairs of seeds per arm.'
    """
    seeds = sorted({a["seeds"] for a in report.get("arms", [])})
    notes = list(dict.fromkeys(e["pairs_note"] for e in report.get("lmc", {}).values() if "pairs_note" in e))
    text = f"Test accuracy: mean ± sample std over {'/'.join(map(str, seeds)) or '?'} seeds."
    if notes:
        text += f" LMC columns: mean ± sample std over {'; '.join(notes)} of seeds per arm."
    if report.get("anchor_values") and any(a.get("method") == "anchor" for a in report.get("arms", [])):
        text += f" Anchors: {report['anchor_values']}."
    return text


def markdown_summary(report: dict[str, Any]) -> str:
    """The arms table of a train report: accuracy, LMC barriers and fusion, mean ± sample std over
    pairs (barriers) or seeds (accuracy), and a sentence saying which (`statistics_note`).
    Nets with BatchNorm get a second row per arm with the statistics reset at every α ("BN
    reset")."""
    rows = []
    for arm in report["arms"]:
        lm = report.get("lmc", {}).get(arm["arm"], {})
        acc = pm(arm["test_accuracy_mean"], arm["test_accuracy_std"])
        rows.append(summary_row(arm["arm"], arm["seeds"], acc, lm))
        if "bn_reset" in lm:
            rows.append(summary_row(f"{arm['arm']} (BN reset)", arm["seeds"], acc, lm["bn_reset"]))
    return anchor_line(report) + markdown_table(rows, SUMMARY_COLUMNS) + "\n\n" + statistics_note(report)


# The jitted training function(s) of tna_jax.training (one compile = the whole sweep is one program).
_STEP_FUNCTIONS = ("jit(run_chunk)", "jit(run_epoch)")


@dataclasses.dataclass
class Trained:
    """What :func:`train_and_analyse` returns: the report and the objects behind it.

    Attributes:
      report: the train report (JSON-ready dict).
      net: the model (``tna_jax.models.Net``).
      dataset: the host dataset (``tna_jax.data.Dataset``).
      result: the ``tna_jax.training.TrainResult`` of :func:`tna_jax.training.fit`.
      data: the dataset on the device (``tna_jax.data.DeviceData``).

    Examples:
      >>> trained = Trained(report={"name": "toy", "markdown": "| arm |"}, net=None, dataset=None, result=None,
      ...                   data=None)
      >>> trained.report["name"]
      'toy'
    """

    report: dict[str, Any]
    net: Any
    dataset: Any
    result: Any
    data: Any  # DeviceData


def load_problem(config: Any) -> tuple[Any, Any, Any]:
    """``(dataset, net, augment)`` from ``config.data`` and ``config.model``.

    Args:
      config: the experiment config.

    Returns:
      ``(dataset, net, augment)``: the loaded :class:`tna_jax.data.Dataset`, the model built for
      its input shape and class count, and ``augment(key, x)`` for ``data.augment="crop_flip"``
      (None otherwise).

    Raises:
      tna_jax.config.ConfigError: ``data.augment="crop_flip"`` on data that are not images; and
        the errors of :func:`tna_jax.data.load` and :func:`tna_jax.models.build`.

    Examples:
      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.data.source, c.data.num_samples, c.model.name = "synthetic", 200, "cnn"
      >>> c.data.synthetic.shape = (8, 8, 1)
      >>> dataset, net, augment = load_problem(c)
      >>> dataset.input_shape, dataset.sizes(), net.name, augment is None
      ((8, 8, 1), {'train': 144, 'val': 16, 'test': 40}, 'cnn', True)
      >>> c.data.synthetic.shape, c.data.augment, c.model.name = (32,), "crop_flip", "mlp"
      >>> load_problem(c)
      Traceback (most recent call last):
      ...
      tna_jax.config.ConfigError: config.data.augment='crop_flip' needs images; synthetic has features.
    """
    from tna_jax import data as data_lib
    from tna_jax import models

    dataset = data_lib.load(config.data)
    net = models.build(config.model, dataset.input_shape, dataset.num_classes)
    augment = None
    if config.data.augment == "crop_flip":
        if dataset.kind != "image":
            raise config_lib.ConfigError(f"config.data.augment='crop_flip' needs images; {dataset.name} has "
                                         f"{dataset.kind}.")
        from tna_jax.data.augment import augment_images

        augment = augment_images
    return dataset, net, augment


def train_and_analyse(config: Any, workdir: str | None, *, lmc: bool | None = None) -> Trained:
    """Multi-seed training of every arm (resuming from `workdir`'s checkpoints), then the train
    report: per-arm accuracy, masks and (when ``lmc``, default ``config.analysis.lmc``) pairwise
    LMC and fusion. Writes nothing but what :func:`tna_jax.training.fit` writes.

    Args:
      config: the experiment config.
      workdir: the run directory (checkpoints, metrics), or None.
      lmc: run the LMC analysis (None: ``config.analysis.lmc``; needs at least 2 seeds).

    Returns:
      A :class:`Trained` with the report (``data``, ``model``, ``devices``, ``training``,
      ``arms``, ``runs``, ``mask``, ``lmc``, ``seconds_total``) and the objects behind it.

    Raises:
      tna_jax.config.ConfigError: see :func:`load_problem`; and the errors of
        :func:`tna_jax.training.fit` (``TrainingDiverged``, ``Preempted``, a bad batch size).

    Examples:
      A real run trains (``tests/test_training.py``); a config that cannot work stops before any:

      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.data.source, c.data.augment = "synthetic", "crop_flip"
      >>> train_and_analyse(c, None)
      Traceback (most recent call last):
      ...
      tna_jax.config.ConfigError: config.data.augment='crop_flip' needs images; synthetic has features.
    """
    from tna_jax import data as data_lib
    from tna_jax import training

    t0 = time.time()
    dataset, net, augment = load_problem(config)
    with count_compiles() as compiles:
        result = training.fit(config, net, dataset, workdir=workdir, augment=augment)
    report: dict[str, Any] = {
        "name": config.name,
        "kind": "train",
        "data": {"name": dataset.name, "sizes": dataset.sizes(), "input_shape": list(dataset.input_shape),
                 "num_classes": dataset.num_classes},
        "model": {"name": net.name, "params": net.param_count(), "batch_norm": net.has_batch_stats,
                  "init": net.init_scheme},
        "devices": {"backend": jax.default_backend(), "count": jax.device_count()},
        "anchor_values": anchor_values_note(config),
        "statistics": {"std": "sample standard deviation (ddof=1) over seeds or seed pairs",
                       "pairs": config.analysis.get("pairs", "all"), "max_pairs": int(config.analysis.max_pairs),
                       "pairs_seed": int(config.analysis.get("pairs_seed", 0))},
        "training": {"seconds": result.seconds, "epochs": config.train.epochs, "resumed_from": result.resumed_from,
                     "runs": len(result.runs), "epoch_compiles": sum(n for f, n in compiles.items() if f in _STEP_FUNCTIONS)},
        "arms": training.summarize(result),
        "runs": [{**r.describe(), "test_accuracy": float(result.test["accuracy"][r.index]),
                  "test_loss": float(result.test["loss"][r.index]),
                  "val_accuracy": float(result.val["accuracy"][r.index])} for r in result.runs],
    }
    if result.mask is not None:
        from tna_jax import anchors

        report["mask"] = {r.arm.label: anchors.mask_summary(jax.tree.map(lambda m, i=r.index: m[i], result.mask))["overall"]
                          for r in result.runs if r.seed == 0}
        report["anchor"] = anchor_report(config, result)
    device_data = data_lib.to_device(dataset, normalize=config.data.normalize)
    if (config.analysis.lmc if lmc is None else lmc) and config.num_seeds >= 2:
        report["lmc"] = analyse_lmc(config, net, result, device_data)
    report["seconds_total"] = time.time() - t0
    return Trained(report=report, net=net, dataset=dataset, result=result, data=device_data)


def anchor_report(config: Any, result: Any) -> dict[str, Any]:
    """What a report says about the anchors: whether their values were shared across seeds,
    the mask-drawing scheme, the refresh period, and per arm whether every run's anchored
    entries still hold their values (`tna_jax.anchors.verify`)."""
    from tna_jax import anchors

    held = np.asarray(jax.vmap(anchors.verify)(result.state.params, result.state.opt_state))
    arms: dict[str, bool] = {}
    for run in result.runs:
        if run.arm.ratio > 0:
            arms[run.arm.label] = arms.get(run.arm.label, True) and bool(held[run.index])
    return {"values": "shared" if config.anchor.share_values else "per-model",
            "mask_scheme": anchors.MASK_SCHEME, "refresh_every": int(config.anchor.refresh_every),
            "granularity": config.anchor.granularity, "verified": arms}


def anchor_line(report: dict[str, Any]) -> str:
    """One Markdown line on the anchors of a train report ("" when it has none)."""
    a = report.get("anchor")
    if not a:
        return ""
    held = "hold their values in every run" if all(a["verified"].values()) else \
        "DO NOT all hold their values: " + ", ".join(k for k, v in a["verified"].items() if not v)
    refresh = f", a fresh mask every {a['refresh_every']} steps" if a.get("refresh_every") else ""
    return (f"Anchors: {a['values']} values across seeds, {a['granularity']} granularity{refresh}; "
            f"mask scheme `{a['mask_scheme']}`; anchored entries {held} (checked after training).\n\n")


def _sweep_rows(report: dict[str, Any], key: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for arm in report["arms"]:
        lm = report.get("lmc", {}).get(arm["arm"], {})
        lm = lm.get(key, {}) if key else lm
        if "interp_accuracy_mean" in lm:
            rows.append({"method": arm["method"], "ratio": arm["ratio"], **{k: v for k, v in lm.items()
                                                                             if k.endswith(("_mean", "_std"))}})
    return rows


def write_report(workdir: str, config: Any, report: dict[str, Any],
                 plots: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Writes an experiment's ``report.json`` and ``report.md``, then its plots: every kind's last step.

    ``report.md`` is ``# <config.name>`` and ``report["markdown"]``. Both files are written
    atomically before any plot is drawn, so a plotting failure (a missing font, a full disk)
    still leaves a complete report; when ``config.analysis.plots`` is on, ``plots()`` draws the
    figures and returns their paths, whose file names are recorded in ``report["plots"]`` and
    ``report.json`` is written again.

    Args:
      workdir: the run directory.
      config: the experiment config (``name``, ``analysis.plots``).
      report: the JSON-serialisable report, with a ``"markdown"`` entry.
      plots: draws the figures into `workdir`, returns their paths (None: no figures).

    Returns:
      `report` (with ``"plots"`` when figures were drawn).

    Examples:
      >>> import json, os, tempfile
      >>> from tna_jax.config import default_config
      >>> workdir, c = tempfile.mkdtemp(), default_config()
      >>> def draw():
      ...     open(os.path.join(workdir, "bars.png"), "wb").close()
      ...     return [os.path.join(workdir, "bars.png")]
      >>> _ = write_report(workdir, c, {"markdown": "| a |"}, plots=draw)
      >>> json.load(open(os.path.join(workdir, "report.json")))["plots"], sorted(os.listdir(workdir))
      (['bars.png'], ['bars.png', 'report.json', 'report.md'])
    """
    json_path = os.path.join(workdir, "report.json")
    ckpt_lib.write_json(json_path, report)
    ckpt_lib.write_text(os.path.join(workdir, "report.md"), f"# {config.name}\n\n{report['markdown']}\n")
    if plots is not None and config.analysis.plots:
        report["plots"] = [os.path.basename(p) for p in plots() or []]
        ckpt_lib.write_json(json_path, report)
    return report


def write_train_outputs(config: Any, workdir: str, trained: Trained) -> None:
    """``report.json``, ``report.md`` and the plots of a train report: ``lmc_paths.png`` (the
    arms of ``analysis.plot_ratios``, or all), and for ratio sweeps ``ratio_sweep.png`` (the
    paper's Figure 2; ``ratio_sweep_bn_reset.png`` too for BatchNorm nets).

    Args:
      config: the experiment config (``analysis.plots``, ``analysis.plot_ratios``, the sweep).
      workdir: the run directory.
      trained: what :func:`train_and_analyse` returned, its report with a ``markdown`` table.

    Examples:
      >>> import os, tempfile
      >>> from tna_jax.config import default_config
      >>> workdir = tempfile.mkdtemp()
      >>> trained = Trained(report={"name": "toy", "arms": [], "markdown": "| arm |"}, net=None, dataset=None,
      ...                   result=None, data=None)
      >>> write_train_outputs(default_config(), workdir, trained)  # no "lmc" in the report: no plots
      >>> sorted(os.listdir(workdir)), open(os.path.join(workdir, "report.md")).read().splitlines()
      (['report.json', 'report.md'], ['# experiment', '', '| arm |'])
    """
    report = trained.report
    write_report(workdir, config, report, plots=(lambda: _train_plots(config, workdir, trained))
                 if "lmc" in report else None)


def _train_plots(config: Any, workdir: str, trained: Trained) -> list[str]:
    from tna_jax import plotting

    report, paths = trained.report, []
    sweep = bool(len(config.sweep.anchor_ratios) or len(config.sweep.prune_ratios))
    title = f"{config.name}: {trained.net.name} on {trained.dataset.name}"
    if "anchor" in report:
        title += f" ({anchor_values_note(config)})"
    shown = {float(r) for r in config.analysis.plot_ratios}
    arms = {a["arm"]: a for a in report["arms"]}
    curves = {}
    for label, e in report["lmc"].items():
        if "curve" not in e or (shown and float(arms[label]["ratio"]) not in shown):
            continue
        curves[label] = e["curve"]
        if "bn_reset" in e:
            curves[f"{label} (BN reset)"] = e["bn_reset"]["curve"]
    notes = "; ".join(dict.fromkeys(e["pairs_note"] for e in report["lmc"].values() if "pairs_note" in e))
    setting = (f"{config.num_seeds} seeds per arm; {anchor_values_note(config)}; model.init={trained.net.init_scheme}; "
               f"{config.analysis.split} split")
    if curves:
        paths.append(plotting.plot_lmc_paths(curves, os.path.join(workdir, "lmc_paths.png"), title=title,
                                             caption=f"Lines: mean, bands: ± sample std over {notes}. {setting}."))
    if sweep:
        caption = (f"Points: mean over {notes}; error bars: ± sample std of Interp. Acc.; shaded: the accuracy "
                   f"barrier (Avg. Acc. − Interp. Acc.). {setting}.")
        paths.append(plotting.plot_ratio_sweep(_sweep_rows(report), os.path.join(workdir, "ratio_sweep.png"),
                                               title=title, caption=caption))
        if trained.net.has_batch_stats and _sweep_rows(report, "bn_reset"):
            paths.append(plotting.plot_ratio_sweep(_sweep_rows(report, "bn_reset"),
                                                   os.path.join(workdir, "ratio_sweep_bn_reset.png"),
                                                   title=f"{title} (BN reset)", caption=caption))
    return paths


@register("train")
def train_experiment(config: Any, workdir: str | None) -> dict[str, Any]:
    """Multi-seed training of every arm, then pairwise LMC and fusion within each arm.

    The ``"train"`` kind: :func:`train_and_analyse`, the arms table (``report["markdown"]``,
    printed) and, with a workdir, :func:`write_train_outputs`.

    Args:
      config: the experiment config.
      workdir: the run directory, or None to write nothing.

    Returns:
      The train report (see :func:`train_and_analyse`) with its ``markdown`` table.

    Raises:
      tna_jax.config.ConfigError: see :func:`train_and_analyse`.

    Examples:
      ``python train.py --config configs/quickstart.py --workdir runs/quick`` runs this kind; a
      config that cannot work stops before training:

      >>> from tna_jax.config import default_config
      >>> c = default_config()
      >>> c.data.source, c.data.augment = "synthetic", "crop_flip"
      >>> EXPERIMENTS["train"] is train_experiment
      True
      >>> train_experiment(c, None)
      Traceback (most recent call last):
      ...
      tna_jax.config.ConfigError: config.data.augment='crop_flip' needs images; synthetic has features.
    """
    trained = train_and_analyse(config, workdir)
    report = trained.report
    report["markdown"] = markdown_summary(report)
    print(report["markdown"])
    if workdir:
        write_train_outputs(config, workdir, trained)
    return report
