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


def point(name: str) -> None:
    """Kills this process with SIGKILL if `name` is one of the points in ``$TNA_JAX_KILL_AT``."""
    spec = os.environ.get(ENV)
    if spec and name in spec.split(","):
        os.kill(os.getpid(), signal.SIGKILL)
