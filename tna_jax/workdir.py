"""The workdir of a run: its lock, its `config.json` (written, or checked on resume), and paths
inside it that a config may name.

A workdir gets `config.json`, `metrics.jsonl`, `checkpoints/` (orbax), `report.json`,
`report.md` and PNG plots. It is locked while a run uses it (a second run on the same workdir
fails at once; a lock left by a killed process is taken over), and rerunning the same command
resumes from the last good checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Any

from tna_jax import checkpoint as ckpt_lib
from tna_jax import config as config_lib

__all__ = ["WorkdirBusy", "WorkdirLock", "config_dict", "prepare_workdir", "check_resume", "workdir_path"]


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
    """A config as the plain JSON dict `config.json` holds (tuples as lists, NaN as null).

    Args:
      config: an `ml_collections.ConfigDict` or a mapping.

    Returns:
      The dict.

    Examples:
      >>> config_dict({"a": (1, 2), "b": float("nan")})
      {'a': [1, 2], 'b': None}
    """
    return _normalise(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def prepare_workdir(config: Any, workdir: str) -> None:
    """Writes ``config.json``, or checks it against the existing one when resuming.

    Args:
      config: the run's config.
      workdir: the run directory (created).

    Raises:
      tna_jax.config.ConfigError: the workdir holds a run with a different config (the message
        lists the fields that differ; only fields in ``config.RESUME_SAFE_FIELDS`` may change on
        resume; a field of ``config.ADDED_FIELDS`` missing from an older ``config.json`` counts
        as its default, and one of ``config.RENAMED_FIELDS`` stored under its old name counts as
        the new one), or a damaged ``config.json``; ``train.epochs`` changed under a schedule that depends on the
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
    check_resume(config, workdir)
    ckpt_lib.write_json(os.path.join(workdir, "config.json"), config_dict(config))


def check_resume(config: Any, workdir: str) -> None:
    """Checks `config` against the ``config.json`` of `workdir` (nothing to check when there is
    none), reading only: the checks of :func:`prepare_workdir`, for ``train.py --dry_run``.

    Args:
      config: the run's config.
      workdir: the run directory (it need not exist).

    Raises:
      tna_jax.config.ConfigError: as :func:`prepare_workdir`.

    Examples:
      >>> import tempfile
      >>> from tna_jax.config import default_config
      >>> check_resume(default_config(), tempfile.mkdtemp())  # a fresh workdir: nothing to check
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    new = config_dict(config)
    try:
        old = ckpt_lib.read_json(path)
    except ValueError as err:
        raise config_lib.ConfigError(f"{path} is damaged ({err}); move the workdir aside or delete config.json "
                         "to start afresh.") from None
    flat_old, flat_new = config_lib.flatten(old), config_lib.flatten(new)
    for was, now in config_lib.RENAMED_FIELDS.items():  # written under a field's old name
        if was in flat_old and now not in flat_old:
            flat_old[now] = flat_old.pop(was)
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
        raise config_lib.ConfigError(f"workdir {workdir} holds a run with a different config: {shown}"
                         + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
                         + ". Use another --workdir, or the same config to resume.")


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
