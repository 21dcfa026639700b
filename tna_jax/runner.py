"""`run(config, workdir)`: what `train.py` and notebooks call. Validates the config, picks the
kind (`config.kind`), locks and prepares the workdir, and, under `jax.distributed`, makes
process 0 the one that writes it. Holds no algorithm of its own."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import jax
import numpy as np

from tna_jax import config as config_lib
from tna_jax import preflight
from tna_jax.experiments.registry import find, load_all
from tna_jax.workdir import WorkdirBusy, WorkdirLock, prepare_workdir

__all__ = ["run", "is_primary", "MULTIPROCESS_KINDS"]


def run(config: Any, workdir: str | None = None) -> dict[str, Any]:
    """Runs the experiment that `config` describes and returns its report (also written to
    ``<workdir>/report.json`` when a workdir is given).

    Nothing is written before the config and the workdir pass their checks
    (`tna_jax.config.validate`, `tna_jax.preflight`). Then the workdir is locked for the run
    (:class:`WorkdirLock`) and its ``config.json`` written or checked (:func:`prepare_workdir`);
    a rerun resumes. A first start that fails before the kind wrote anything (a dataset that
    does not load, anchors that select no weight) leaves no workdir behind.

    Args:
      config: the experiment config; ``config.kind`` picks the function (``"train"`` by default).
      workdir: the run directory, or None to write nothing.

    Returns:
      The report dict of the experiment kind.

    Raises:
      tna_jax.config.ConfigError: an invalid config, an unknown kind, model or data source, or
        a workdir that holds a run with a different config.
      tna_jax.preflight.WorkdirError: the workdir cannot be created or written.
      WorkdirBusy: another process holds the workdir.

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
    kind_fn = find(kind)
    if kind_fn is None:
        raise config_lib.ConfigError(f"config.kind must be one of {sorted(load_all())}; got {kind!r}.")
    preflight.check_config(config)
    if workdir is not None:
        preflight.check_workdir(workdir)
    if jax.process_count() > 1:
        return _run_multiprocess(config, kind, kind_fn, workdir)
    if workdir is None:
        return kind_fn(config, None)
    workdir = os.path.abspath(workdir)
    created = preflight.make_workdir(workdir)
    fresh = False
    try:
        with WorkdirLock(workdir) as lock:
            if lock.previous_holder:
                h = lock.previous_holder
                print(f"workdir {workdir}: took over the lock of pid {h.get('pid')} on {h.get('host')} (since "
                      f"{h.get('started')}), which ended without releasing it; resuming from its checkpoints.")
            fresh = not os.path.exists(os.path.join(workdir, "config.json"))
            prepare_workdir(config, workdir)
            return kind_fn(config, workdir)
    except BaseException:
        if fresh:
            _undo_fresh_start(workdir, created)
        raise


def _undo_fresh_start(workdir: str, created: bool) -> None:
    """Removes what a first start wrote when it failed before the kind wrote anything of its own:
    the workdir is then as it was (absent, if this run created it)."""
    own = {".lock", "config.json"}
    try:
        names = set(os.listdir(workdir))
        if not names <= own:
            return  # the run got far enough to leave metrics or checkpoints: keep them
        for name in names:
            os.remove(os.path.join(workdir, name))
        if created:
            os.rmdir(workdir)
    except OSError:
        pass  # best effort: a leftover config.json is harmless (the next start rewrites it)


# Kinds whose programs span several processes (jax.distributed): the federated rounds split the
# clients across processes; the others split the run axis (arms x seeds) over every process's
# devices (tna_jax.distributed). A kind not listed runs in one process only.
MULTIPROCESS_KINDS = ("federated", "train", "grid", "layerwise", "align_compare", "soup", "cold_fusion")


def is_primary() -> bool:
    """Whether this process writes the workdir's files.

    Returns:
      True for process 0 (always, in one process).
    """
    return jax.process_index() == 0


def _run_multiprocess(config: Any, kind: str, kind_fn: Any, workdir: str | None) -> dict[str, Any]:
    """:func:`run` under ``jax.distributed``: every process runs the same program; process 0 holds
    the workdir lock and writes ``config.json``, metrics and reports, all processes take part in
    the orbax checkpoints (one shared directory, as orbax expects on several hosts)."""
    from jax.experimental import multihost_utils

    if kind not in MULTIPROCESS_KINDS:
        raise config_lib.ConfigError(
            f"config.kind={kind!r} runs in one process; {jax.process_count()} processes were started "
            f"(jax.distributed). Kinds that span processes: {list(MULTIPROCESS_KINDS)}.")
    if workdir is None:
        with _quiet_unless_primary():
            return kind_fn(config, None)
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
        with _quiet_unless_primary():
            return kind_fn(config, workdir)
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def _quiet_unless_primary():
    """Process 0 prints the tables and progress lines; the other processes' stdout is dropped (their
    errors still reach stderr), so a multi-process run prints each table once."""
    if is_primary():
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield
