"""The experiment kinds: `config.kind` names one, `register` adds one.

A kind is `fn(config, workdir) -> report`; `workdir` is None when nothing may be written.
Importing `tna_jax.experiments` imports every module of the package, and each registers its
kinds here (so adding a kind means adding a module: see `docs/architecture.md`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["KINDS", "register"]

Kind = Callable[[Any, "str | None"], dict[str, Any]]
KINDS: dict[str, Kind] = {}


def register(kind: str):
    """Decorator adding an experiment kind: ``fn(config, workdir) -> report dict``.

    Args:
      kind: the ``config.kind`` value that selects the function.

    Returns:
      The decorator (it returns the function unchanged).

    Raises:
      ValueError: `kind` is already registered to another function.

    Examples:
      >>> @register("test_doc_kind")
      ... def hello(config, workdir):
      ...     return {"kind": "test_doc_kind", "seeds": config.num_seeds}
      >>> from tna_jax.config import default_config
      >>> from tna_jax.runner import run
      >>> c = default_config()
      >>> c.kind = "test_doc_kind"
      >>> run(c)
      {'kind': 'test_doc_kind', 'seeds': 4}
    """

    def deco(fn):
        old = KINDS.get(kind)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"experiment kind {kind!r} is already registered to {old.__module__}.{old.__qualname__}.")
        KINDS[kind] = fn
        return fn

    return deco
