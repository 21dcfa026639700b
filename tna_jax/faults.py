"""Deterministic fault injection for the crash-and-resume tests.

Set ``TNA_JAX_KILL_AT`` to a point name (``"after_save:4"``, ``"epoch_end:3"``,
``"before_save:2"``, ``"write:report.json"``, ...) and the process SIGKILLs itself when it
reaches that point, exactly as a preemption or an OOM kill would. Unset (the default),
:func:`point` costs one dict lookup. Several points may be given, comma-separated; the first one
reached fires. ``TNA_JAX_TERM_AT`` sends SIGTERM (a preemption notice) instead, and
``TNA_JAX_STOP_AT`` SIGSTOPs the process (it keeps its locks until someone sends SIGCONT: how the
tests hold a workdir busy for as long as they need).

Points that cover a stretch of work rather than an instant (``"during_save:2"``, a checkpoint
being written) use :func:`during`: a watchdog thread kills the process while the block writes
its temporary files, after ``TNA_JAX_KILL_FILES`` of them exist (default 1).

The points the library raises: ``chunk_end:<epoch>.<step>``, ``epoch_end:<epoch>``,
``before_save:<p>``, ``during_save:<p>``, ``after_save:<p>`` (``<p>`` is the epoch, or
``<epoch>.<step>`` for a mid-epoch checkpoint; :func:`tna_jax.training.fit`) and
``write:<file name>`` just before an atomic write renames its temporary file into place
(:func:`tna_jax.checkpoint.write_json`, :func:`tna_jax.checkpoint.write_text`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

ENV = "TNA_JAX_KILL_AT"
TERM_ENV = "TNA_JAX_TERM_AT"
STOP_ENV = "TNA_JAX_STOP_AT"
FILES_ENV = "TNA_JAX_KILL_FILES"
ORBAX_TMP = ".orbax-checkpoint-tmp"


def _armed(env: str, name: str) -> bool:
    spec = os.environ.get(env)
    return bool(spec) and name in spec.split(",")


def point(name: str) -> None:
    """SIGKILLs this process if `name` is in ``$TNA_JAX_KILL_AT``; sends it SIGTERM (a
    preemption notice, which training honours at the next step boundary) if `name` is in
    ``$TNA_JAX_TERM_AT``; SIGSTOPs it if `name` is in ``$TNA_JAX_STOP_AT``.

    Example:
      >>> point("nothing_armed:1")  # no-op unless the environment arms it
    """
    if _armed(ENV, name):
        os.kill(os.getpid(), signal.SIGKILL)
    if _armed(TERM_ENV, name):
        os.kill(os.getpid(), signal.SIGTERM)
    if _armed(STOP_ENV, name):
        os.kill(os.getpid(), signal.SIGSTOP)


def _count_files(directory: str, marker: str) -> int:
    total = 0
    try:
        entries = os.listdir(directory)
    except OSError:
        return 0
    for entry in entries:
        if marker in entry:
            for _, _, files in os.walk(os.path.join(directory, entry)):
                total += len(files)
            total = max(total, 1)  # the temporary entry itself counts once it exists
    return total


@contextlib.contextmanager
def during(name: str, directory: str, marker: str = ORBAX_TMP) -> Iterator[None]:
    """Kills the process in the middle of the block's writes when `name` is in ``$TNA_JAX_KILL_AT``.

    A daemon thread polls `directory` for temporary entries whose name contains `marker`
    (orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it when complete)
    and SIGKILLs the process once they hold ``$TNA_JAX_KILL_FILES`` files (default 1). If the
    block finishes first (a write smaller than the threshold), the kill happens at its end, so
    an armed point always fires. Unarmed, the block runs as is.

    Args:
      name: the point name, e.g. ``"during_save:3"``.
      directory: where the block writes.
      marker: substring that marks a temporary entry.

    Example:
      >>> import tempfile
      >>> with during("nothing_armed:1", tempfile.mkdtemp()):
      ...     pass
    """
    if not _armed(ENV, name):
        yield
        return
    threshold = max(1, int(os.environ.get(FILES_ENV, "1")))
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if _count_files(directory, marker) >= threshold:
                os.kill(os.getpid(), signal.SIGKILL)
            done.wait(0.0002)

    thread = threading.Thread(target=watch, name=f"kill:{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    os.kill(os.getpid(), signal.SIGKILL)
