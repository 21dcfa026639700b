"""The experiment kinds: `config.kind` names one, `register` adds one.

A kind is `fn(config, workdir) -> report`; `workdir` is None when nothing may be written.
The built-in kinds live in modules of `tna_jax.experiments` named like the kind; `find(kind)`
imports only the module a run needs (a run of one kind never pays for importing the others).
A kind of your own registers itself when its module is imported (see `docs/architecture.md`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["KINDS", "BUILT_IN", "register", "find", "load_all"]

Kind = Callable[[Any, "str | None"], dict[str, Any]]
KINDS: dict[str, Kind] = {}
# Built-in kinds and the module (in tna_jax.experiments) that registers each.
BUILT_IN = {"train": "train", "grid": "grid", "layerwise": "layerwise", "align_compare": "align_compare",
            "soup": "soup", "cold_fusion": "cold_fusion", "federated": "federated"}


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


def find(kind: str) -> Kind | None:
    """The function of `kind`, importing its built-in module when needed; None when unknown.

    Args:
      kind: a `config.kind` value.

    Returns:
      The registered function, or None.

    Examples:
      >>> find("train").__name__, find("no_such_kind")
      ('train_experiment', None)
    """
    if kind not in KINDS and kind in BUILT_IN:
        import importlib

        importlib.import_module(f"tna_jax.experiments.{BUILT_IN[kind]}")
    return KINDS.get(kind)


def load_all() -> dict[str, Kind]:
    """Imports every built-in kind; returns the registry (for listing kinds in messages).

    Returns:
      `KINDS`, with the built-in kinds in it.
    """
    for kind in BUILT_IN:
        find(kind)
    return KINDS
