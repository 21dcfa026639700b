"""Saving and loading permutations (JSON) and curves (orbax), through :mod:`tna_jax.checkpoint`.

A permutation file records, besides the index arrays, the names and sizes of the spec's
permutations, so that loading it against another architecture fails with a clear message
instead of silently permuting the wrong axes. Curves are saved as an orbax checkpoint of the
three variable trees (endpoints and control point) with the curve kind in the metadata. Nothing
is pickled; files are written atomically.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from tna_jax import checkpoint as ckpt_lib
from tna_jax.align.curves import KINDS, Curve
from tna_jax.align.spec import Permutation, PermutationSpec, check_permutation

__all__ = ["save_permutation", "load_permutation", "save_curve", "load_curve"]

FORMAT = "tna_jax.permutation/1"


def save_permutation(path: str, spec: PermutationSpec, perm: Permutation, *,
                     meta: dict[str, Any] | None = None) -> str:
    """Writes `perm` (checked against `spec`) as JSON to `path`; returns `path`.

    Examples:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from tna_jax.align.spec import dense, spec_from_axes
      >>> spec = spec_from_axes(dense("d", None, "P", bias=False), {"params": {"d": {"kernel": jnp.ones((2, 3))}}})
      >>> path = save_permutation(os.path.join(tempfile.mkdtemp(), "p.json"), spec, {"P": [2, 0, 1]})
      >>> load_permutation(path, spec)["P"].tolist()
      [2, 0, 1]
    """
    perm = {k: np.asarray(v) for k, v in perm.items()}
    check_permutation(spec, perm)
    payload = {"format": FORMAT, "sizes": dict(spec.sizes), "parents": dict(spec.parents),
               "perm": {k: v.astype(int).tolist() for k, v in perm.items()}, "meta": meta or {}}
    return ckpt_lib.write_json(path, payload, indent=None)


def load_permutation(path: str, spec: PermutationSpec) -> Permutation:
    """Reads a permutation written by :func:`save_permutation` and checks it against `spec`.

    Raises:
      FileNotFoundError / ValueError: missing or malformed file (named); a file made for another
        spec (the differing permutations are listed).
    """
    data = ckpt_lib.read_json(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tna_jax permutation file (format {FORMAT!r}).")
    if data["sizes"] != dict(spec.sizes) or data["parents"] != dict(spec.parents):
        mine, theirs = dict(spec.sizes), data["sizes"]
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise ValueError(f"{path} was saved for another permutation spec; permutations that differ "
                         f"(name: file vs spec): {[(k, theirs.get(k), mine.get(k)) for k in differ[:6]]}.")
    perm = {k: np.asarray(v, np.int32) for k, v in data["perm"].items()}
    check_permutation(spec, perm, argument=path)
    return perm


def save_curve(directory: str, curve: Curve, *, meta: dict[str, Any] | None = None) -> str:
    """Saves a curve as an orbax checkpoint in `directory`; returns the directory."""
    ckpt = ckpt_lib.Checkpointer(directory, keep=1)
    try:
        ckpt.save(0, {"a": curve.a, "control": curve.control, "b": curve.b},
                  meta={"kind": curve.kind, **(meta or {})})
    finally:
        ckpt.close()
    return os.path.abspath(directory)


def load_curve(directory: str, like: Any) -> Curve:
    """Loads a curve saved by :func:`save_curve`; `like` is a model's variables (or a
    :class:`Curve`) giving the structure, shapes and dtypes to restore.

    Raises:
      tna_jax.checkpoint.CheckpointError: no (good) checkpoint in `directory`.
      ValueError: the saved curve kind is unknown.
    """
    v = (like.a if isinstance(like, Curve) else like)
    ckpt = ckpt_lib.Checkpointer(directory, keep=1)
    try:
        state, _, meta = ckpt.restore({"a": v, "control": v, "b": v})
    finally:
        ckpt.close()
    kind = meta.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{directory} holds a curve of unknown kind {kind!r}; expected one of {KINDS}.")
    return Curve(a=state["a"], control=state["control"], b=state["b"], kind=kind)
