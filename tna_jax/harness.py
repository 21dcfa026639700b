"""The loop harness: what every long loop of tna_jax (``fit``'s epochs, federated rounds, ColD
fusion rounds) needs besides its own step.

:class:`Loop` owns, for one loop over iterations ``start..total-1``:

* stop signals: SIGTERM/SIGINT are recorded, not fatal; the loop checkpoints at the next
  iteration (or step) boundary and raises :class:`Preempted` (also after the last iteration);
* divergence: :meth:`Loop.diverged` builds the :class:`TrainingDiverged` that names the kept
  checkpoint;
* progress: a tqdm bar (optional);
* metrics: a :class:`tna_jax.logs.MetricsLog`, flushed to TensorBoard at every checkpoint;
* checkpoint cadence: every ``checkpoint_every`` iterations, at the last one and when stopping,
  with named hook points around every save (:mod:`tna_jax.hooks`).

The loop body stays the caller's: a new experiment kind writes its step and its rows, and gets
the rest by ``with Loop(...) as loop: for i in loop.iterations(): ...; loop.end_iteration(...)``.
:func:`resume` restores the latest good checkpoint and trims the checkpoint directory for it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from tna_jax import hooks as hooks_lib

__all__ = ["Loop", "StopSignal", "Preempted", "TrainingDiverged", "resume"]


class TrainingDiverged(RuntimeError):
    """A run produced a non-finite loss; training stopped and the last good checkpoint stays."""


class Preempted(RuntimeError):
    """SIGTERM (or SIGINT) arrived; a checkpoint was saved at the next step boundary."""


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint and stop cleanly.

    Installed only in the main thread (Python's rule for signal handlers); :meth:`restore` puts
    the previous handlers back. A second Ctrl-C raises ``KeyboardInterrupt`` at once.

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


def resume(checkpointer: Any, target: Any, position: Callable[[Mapping[str, Any]], int]
           ) -> tuple[Any, dict[str, Any]] | None:
    """Restores the latest good checkpoint and trims the directory to match it.

    Steps newer than the restored one (unreadable ones the restore skipped) are deleted, and so
    are steps beyond the checkpointer's ``keep`` (a process killed between orbax finalising a
    step and deleting the oldest leaves one too many).

    Args:
      checkpointer: a :class:`tna_jax.checkpoint.Checkpointer`, or None.
      target: the abstract state to restore into.
      position: ``position(meta)``: the checkpoint step of the restored metadata.

    Returns:
      ``(state, meta)``, or None when there is nothing to resume.
    """
    if checkpointer is None or checkpointer.latest_step() is None:
        return None
    state, _, meta = checkpointer.restore(target)
    checkpointer.delete_after(position(meta))
    checkpointer.prune()
    return state, meta


class Loop:
    """Stop signals, divergence, progress, metrics and checkpoint cadence of one loop.

    Used as a context manager: entering installs the signal handlers and the progress bar,
    leaving restores the handlers and closes the bar, `metrics` and `checkpointer`.

    Args:
      total: iterations of the whole loop (epochs, rounds).
      start: the first iteration to run (a resumed loop's completed iterations).
      unit: the iteration's name in messages and on the bar (``"epoch"``, ``"round"``).
      checkpointer: where checkpoints go (None: nothing is saved).
      checkpoint_every: save after every this many iterations (and after the last one).
      metrics: a :class:`tna_jax.logs.MetricsLog` (None: no metrics).
      progress: show a tqdm bar.
      desc: the bar's label.
      hooks: callables ``hook(point, directory)`` called at the loop's named points (None: those
        installed with :func:`tna_jax.hooks.installed`).
      agree: ``agree(stopping) -> bool`` combining this process's stop request with the other
        processes' (under ``jax.distributed`` a signal to one stops all); default: as is.

    Examples:
      A loop of 3 iterations that checkpoints every 2 (and after the last):

      >>> import tempfile, jax.numpy as jnp
      >>> from tna_jax.checkpoint import Checkpointer
      >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep=5)
      >>> with Loop(3, checkpoint_every=2, checkpointer=ckpt, hooks=[]) as loop:
      ...     for i in loop.iterations():
      ...         w = jnp.full(2, i + 1.0)  # the iteration's work
      ...         loop.end_iteration(i + 1, lambda d=i + 1, w=w: ckpt.save(d, {"w": w}))
      >>> Checkpointer(ckpt.directory).steps()
      [2, 3]
    """

    def __init__(self, total: int, *, start: int = 0, unit: str = "epoch", checkpointer: Any = None,
                 checkpoint_every: int = 1, metrics: Any = None, progress: bool = False, desc: str = "",
                 hooks: Sequence[hooks_lib.Hook] | None = None, agree: Callable[[bool], bool] | None = None):
        self.total, self.start, self.unit = int(total), int(start), unit
        self.checkpointer, self.checkpoint_every, self.metrics = checkpointer, int(checkpoint_every), metrics
        self.hooks = tuple(hooks) if hooks is not None else hooks_lib.active()
        self._progress, self._desc, self._agree = progress, desc, agree
        self._stop: StopSignal | None = None
        self.bar: Any = None

    def __enter__(self) -> Loop:
        if self._progress and self.total > self.start:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.start, desc=self._desc, unit=self.unit,
                            dynamic_ncols=True)
        self._stop = StopSignal()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._stop.restore()
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.checkpointer is not None:
            self.checkpointer.close()

    def iterations(self) -> Iterator[int]:
        """The iterations left: ``start, ..., total - 1``."""
        return iter(range(self.start, self.total))

    @property
    def stop_requested(self) -> bool:
        """Whether SIGTERM/SIGINT arrived (in this process)."""
        return self._stop is not None and self._stop.signal is not None

    def point(self, name: str, directory: str | None = None) -> None:
        """Calls the hooks at the point `name`."""
        hooks_lib.fire(name, directory, self.hooks)

    def log(self, rows: Sequence[dict[str, Any]]) -> None:
        """Writes metric rows (one per run of an iteration)."""
        if self.metrics is not None:
            self.metrics.write(rows)

    def save(self, label: str, save: Callable[[], None]) -> None:
        """Runs `save` (a checkpoint write) and flushes TensorBoard, between the hook points
        ``before_save:<label>``, ``during_save:<label>`` and ``after_save:<label>``."""
        if self.checkpointer is None:
            return
        self.point(f"before_save:{label}")
        self.point(f"during_save:{label}", self.checkpointer.directory)
        save()
        if self.metrics is not None:
            self.metrics.flush()  # TensorBoard holds every point the checkpoint covers
        self.point(f"after_save:{label}")

    def preempted(self, where: str) -> Preempted:
        """The :class:`Preempted` to raise after the stop checkpoint (`where`: "after epoch 2")."""
        name = signal.Signals(self._stop.signal).name if self.stop_requested else "a signal to another process"
        if self.checkpointer is None:
            return Preempted(f"stopped by {name} {where}; no checkpoints, nothing saved.")
        return Preempted(f"stopped by {name} {where}; checkpoint saved in {self.checkpointer.directory}. "
                         "Rerun the same command to resume.")

    def diverged(self, message: str) -> TrainingDiverged:
        """The :class:`TrainingDiverged` to raise: `message`, and which checkpoint is kept."""
        kept = (f"; the last good checkpoint in {self.checkpointer.directory} is kept." if self.checkpointer
                is not None else ".")
        return TrainingDiverged(message + kept)

    def end_iteration(self, done: int, save: Callable[[], None], *, postfix: Mapping[str, str] | None = None,
                      where: str | None = None) -> None:
        """Ends iteration `done` (1-based): checkpoints on the cadence, at the end or when stopping,
        advances the bar, and raises :class:`Preempted` when a stop was requested.

        Args:
          done: iterations completed.
          save: writes the checkpoint of `done` (called through :meth:`save`).
          postfix: the bar's postfix.
          where: how :class:`Preempted` names the place (default ``"after <unit> <done> of <total>"``).

        Raises:
          Preempted: SIGTERM/SIGINT arrived, here or (with `agree`) in another process; the
            checkpoint of `done` is saved.
        """
        stopping = self.stop_requested
        if self._agree is not None:
            stopping = self._agree(stopping)
        if done % self.checkpoint_every == 0 or done == self.total or stopping:
            self.save(str(done), save)
        if self.bar is not None:
            self.bar.update(1)
            if postfix is not None:
                self.bar.set_postfix(dict(postfix), refresh=False)
        if stopping:
            raise self.preempted(where or f"after {self.unit} {done} of {self.total}")
