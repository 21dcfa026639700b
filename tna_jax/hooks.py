"""Named points of the long loops and writes, where callers (tests, monitors) may hook in.

A hook is ``hook(point, directory)``: `point` names where the program is (``"chunk_end:0.4"``,
``"epoch_end:3"``, ``"round_end:2"``, ``"before_save:2"``, ``"during_save:2"`` just before a
checkpoint write starts, ``"after_save:2"``, ``"write:report.json"`` just before an atomic write
renames its temporary file into place); `directory` is where the write at hand goes (None at
points without one). The library itself installs no hook and reads no environment variable:
hooks are passed to :class:`tna_jax.harness.Loop` (``hooks=``), or installed for a whole call of
``runner.run`` with :func:`installed` (how the crash tests kill a run at a chosen point).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

__all__ = ["Hook", "installed", "active", "fire"]

Hook = Callable[[str, "str | None"], None]

# Scoped by `installed` (a context variable, not a global setting): no hooks unless a caller says so.
_ACTIVE: contextvars.ContextVar[tuple[Hook, ...]] = contextvars.ContextVar("tna_jax_hooks", default=())


@contextlib.contextmanager
def installed(hooks: Sequence[Hook]) -> Iterator[None]:
    """Makes `hooks` the hooks of every loop and atomic write inside the block.

    Args:
      hooks: callables ``hook(point, directory)``.

    Returns:
      A context manager; the previous hooks are back when it exits.

    Examples:
      >>> seen = []
      >>> with installed([lambda point, directory: seen.append(point)]):
      ...     fire("epoch_end:1")
      >>> fire("epoch_end:2")  # outside the block: no hook
      >>> seen
      ['epoch_end:1']
    """
    token = _ACTIVE.set(tuple(hooks))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Hook, ...]:
    """The hooks in place.

    Returns:
      The hooks :func:`installed` put in place (an empty tuple outside it).
    """
    return _ACTIVE.get()


def fire(point: str, directory: str | None = None, hooks: Sequence[Hook] | None = None) -> None:
    """Calls every hook (`hooks`, default :func:`active`) with `point` and `directory`.

    Args:
      point: the point's name.
      directory: where the write at this point goes, or None.
      hooks: the hooks to call (None: the installed ones).
    """
    for hook in active() if hooks is None else hooks:
        hook(point, directory)
