"""Deterministic fault injection for the crash-and-resume tests.

Set ``TNA_JAX_KILL_AT`` to a point name (``"after_save:4"``, ``"epoch_end:3"``,
``"before_save:2"``, ...) and the process SIGKILLs itself when it reaches that point, exactly as
a preemption or an OOM kill would. Unset (the default), :func:`point` costs one dict lookup.
Several points may be given, comma-separated; the first one reached fires.
"""

from __future__ import annotations

import os
import signal

ENV = "TNA_JAX_KILL_AT"
TERM_ENV = "TNA_JAX_TERM_AT"


def point(name: str) -> None:
    """SIGKILLs this process if `name` is in ``$TNA_JAX_KILL_AT``; sends it SIGTERM (a
    preemption notice, which training honours at the next step boundary) if `name` is in
    ``$TNA_JAX_TERM_AT``."""
    spec = os.environ.get(ENV)
    if spec and name in spec.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
    term = os.environ.get(TERM_ENV)
    if term and name in term.split(","):
        os.kill(os.getpid(), signal.SIGTERM)
