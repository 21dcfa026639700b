"""Deterministic fault injection for the crash-and-resume tests, as hooks of `tna_jax.hooks`.

The library only names its points (``chunk_end:<epoch>.<step>``, ``epoch_end:<epoch>``,
``round_end:<round>``, ``before_save:<p>``, ``during_save:<p>``, ``after_save:<p>`` with ``<p>``
the epoch or round, or ``<epoch>.<step>`` for a mid-epoch checkpoint, and ``write:<file name>``
just before an atomic write renames its temporary file into place). A :class:`FaultHook` acts at
chosen points:

* ``kill``: the process SIGKILLs itself there, exactly as a preemption or an OOM kill would;
  at ``during_save:<p>`` a watchdog thread kills it while orbax writes the step's temporary files,
  once ``kill_files`` of them exist (or, if the write finishes first, at ``after_save:<p>``: an
  armed point always fires);
* ``term``: it sends itself SIGTERM (a preemption notice, honoured at the next step boundary);
* ``stop``: it SIGSTOPs itself (it keeps its locks until someone sends SIGCONT).

:func:`from_environment` builds the hook from ``TNA_JAX_KILL_AT``, ``TNA_JAX_TERM_AT``,
``TNA_JAX_STOP_AT`` (comma-separated point names) and ``TNA_JAX_KILL_FILES``: how
``tests/train_with_faults.py`` arms a ``train.py`` process that the crash harness starts.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Mapping

KILL_ENV = "TNA_JAX_KILL_AT"
TERM_ENV = "TNA_JAX_TERM_AT"
STOP_ENV = "TNA_JAX_STOP_AT"
FILES_ENV = "TNA_JAX_KILL_FILES"
ORBAX_TMP = ".orbax-checkpoint-tmp"


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


@dataclasses.dataclass
class FaultHook:
    """``hook(point, directory)`` that kills, terminates or stops this process at chosen points."""

    kill: frozenset[str] = frozenset()
    term: frozenset[str] = frozenset()
    stop: frozenset[str] = frozenset()
    kill_files: int = 1
    _watch: threading.Thread | None = None
    _done: threading.Event | None = None

    def __call__(self, point: str, directory: str | None) -> None:
        if point.startswith("during_save:"):
            if point in self.kill and directory is not None:
                self._start_watchdog(directory)
            return
        if point.startswith("after_save:"):
            self._finish_watchdog()  # an armed during_save always fires, at the latest here
        if point in self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if point in self.term:
            os.kill(os.getpid(), signal.SIGTERM)
        if point in self.stop:
            os.kill(os.getpid(), signal.SIGSTOP)

    def _start_watchdog(self, directory: str) -> None:
        done = threading.Event()
        threshold = max(1, self.kill_files)

        def watch() -> None:
            while not done.is_set():
                if _count_files(directory, ORBAX_TMP) >= threshold:
                    os.kill(os.getpid(), signal.SIGKILL)
                done.wait(0.0002)

        self._done = done
        self._watch = threading.Thread(target=watch, name="kill:during_save", daemon=True)
        self._watch.start()

    def _finish_watchdog(self) -> None:
        if self._watch is None:
            return
        self._done.set()
        self._watch.join()
        os.kill(os.getpid(), signal.SIGKILL)


def _points(env: Mapping[str, str], name: str) -> frozenset[str]:
    return frozenset(p for p in env.get(name, "").split(",") if p)


def from_environment(env: Mapping[str, str] | None = None) -> list[FaultHook]:
    """The fault hook the environment arms (an empty list when it arms none)."""
    env = os.environ if env is None else env
    hook = FaultHook(_points(env, KILL_ENV), _points(env, TERM_ENV), _points(env, STOP_ENV),
                     int(env.get(FILES_ENV, "1")))
    return [hook] if hook.kill or hook.term or hook.stop else []
