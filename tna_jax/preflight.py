"""Checks a run's config and workdir against the machine before anything is written.

`tna_jax.config.validate` checks the config on its own (types, ranges, field names). What it
cannot see is checked here, cheaply, before the runner creates the workdir: that the model
and the data source exist, that a ``tfds:`` dataset is installed and prepared (nothing is ever
downloaded), and that the workdir can be a directory we may write. Each failure is one
:class:`tna_jax.config.ConfigError` or :class:`WorkdirError` naming the field or path, the value
and what is allowed, so `train.py` prints one line and leaves the disk as it was.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from tna_jax import config as config_lib

__all__ = ["WorkdirError", "check_config", "check_workdir", "make_workdir", "out_of_space"]

# errno values that mean "the disk (or a quota, or a file-size limit) is full".
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WorkdirError(OSError):
    """The workdir cannot be created or written (a file in the way, no permission, a full disk)."""


def _field(config: Any, dotted: str) -> Any:
    """`tna_jax.config.get`, or None for a field the config does not have (kinds differ)."""
    try:
        return config_lib.get(config, dotted)
    except (KeyError, TypeError, AttributeError):
        return None


def check_config(config: Any) -> None:
    """Checks the names in `config` that refer to things outside it.

    Checked when the config has the field: ``model.name`` (a registered model), ``data.source``
    (a registered source, or ``tfds:<name>`` with tensorflow-datasets installed, a dataset of
    that name and its files prepared in ``data.data_dir``).

    Args:
      config: the experiment config (already valid by `tna_jax.config.validate`).

    Raises:
      tna_jax.config.ConfigError: naming the field, the value and what is allowed (for a
        dataset that is not prepared: where it was looked for and how to prepare it).

    Examples:
      >>> from tna_jax.config import ConfigError, default_config
      >>> c = default_config()
      >>> check_config(c)
      >>> c.model.name = "resnet_50"
      >>> try:
      ...     check_config(c)
      ... except ConfigError as err:
      ...     print(str(err)[:72])
      config.model.name='resnet_50' is not a model; known models: cnn, mlp, re
    """
    name = _field(config, "model.name")
    if name is not None:
        from tna_jax import models

        if name not in models.REGISTRY:
            raise config_lib.ConfigError(f"config.model.name={name!r} is not a model; known models: "
                                         f"{', '.join(sorted(models.REGISTRY))}.")
    source = _field(config, "data.source")
    if source is not None:
        _check_source(str(source), config.data)


def _check_source(source: str, data_config: Any) -> None:
    from tna_jax import data

    if not source.startswith("tfds:"):
        if source not in data.SOURCES:
            raise config_lib.ConfigError(f"config.data.source={source!r} is not a data source; known sources: "
                                         f"{', '.join(sorted(data.SOURCES))}, or tfds:<name> for a prepared "
                                         "TensorFlow Datasets dataset.")
        return
    from tna_jax.data import tfds_source

    try:
        tfds_source.check(data_config)
    except (ImportError, ValueError, FileNotFoundError) as err:
        text = str(err)
        prefix = f"data.source={source!r}: "
        text = text[len(prefix):] if text.startswith(prefix) else text
        raise config_lib.ConfigError(f"config.data.source={source!r}: {text}") from None


def check_workdir(workdir: str) -> None:
    """Checks that `workdir` is, or can become, a directory this process may write.

    Args:
      workdir: the run directory (absolute or relative).

    Raises:
      WorkdirError: `workdir` is a URL (``gs://...``), or it (or a directory above it) is a file, or the nearest existing
        directory is not writable.

    Examples:
      >>> import os, tempfile
      >>> root = tempfile.mkdtemp()
      >>> check_workdir(os.path.join(root, "new", "run"))  # may be created
      >>> open(os.path.join(root, "taken"), "w").close()
      >>> check_workdir(os.path.join(root, "taken", "run"))
      Traceback (most recent call last):
      ...
      tna_jax.preflight.WorkdirError: --workdir=.../taken/run: .../taken is a file, not a directory; choose another --workdir.
    """
    if "://" in str(workdir):  # os.makedirs would make a local "gs:" directory of it
        raise WorkdirError(f"--workdir={workdir}: a URL; the workdir is written with plain file operations (lock, "
                           "metrics, reports), so give a local or mounted path (a shared filesystem, a GCSFuse "
                           "mount).")
    path = os.path.abspath(workdir)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise WorkdirError(f"--workdir={workdir}: {probe} is a file, not a directory; choose another --workdir.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir={workdir}: {probe} is not writable by this user; choose another "
                           "--workdir or change its permissions.")


def make_workdir(workdir: str) -> bool:
    """Creates `workdir` (and its parents) after :func:`check_workdir`.

    Args:
      workdir: the run directory.

    Returns:
      Whether the directory was created now (False: it existed).

    Raises:
      WorkdirError: it cannot be created (the message keeps the system's reason: a read-only
        filesystem, no permission, no space).
    """
    check_workdir(workdir)
    if os.path.isdir(workdir):
        return False
    try:
        os.makedirs(workdir)
    except FileExistsError:
        return False
    except OSError as err:
        raise WorkdirError(f"--workdir={workdir}: cannot create it: {err.strerror or err}.") from None
    return True


def out_of_space(err: BaseException) -> OSError | None:
    """The "disk full" `OSError` in `err`'s chain of causes, if any.

    Writers deep in a checkpoint library wrap the system's error in their own; this finds it.

    Args:
      err: any exception.

    Returns:
      The first `OSError` with errno ENOSPC, EDQUOT or EFBIG among `err`, its ``__cause__`` and
      ``__context__`` (followed recursively), or None.

    Examples:
      >>> import errno
      >>> try:
      ...     try:
      ...         raise OSError(errno.ENOSPC, "No space left on device")
      ...     except OSError as inner:
      ...         raise RuntimeError("saving checkpoint 3 failed") from inner
      ... except RuntimeError as outer:
      ...     out_of_space(outer).strerror
      'No space left on device'
    """
    seen: set[int] = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in OUT_OF_SPACE:
            return e
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return OSError(errno.ENOSPC, "No space left on device")
        stack.extend([e.__cause__, e.__context__])
    return None
