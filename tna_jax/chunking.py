"""Mapping a function over many points (α values, pairs, candidates) in chunks that bound memory.

`map_points(fn, xs, chunk)` is `jax.lax.map(fn, xs, batch_size=chunk)` with a chunk that is
either given, None (everything in one `vmap`) or `"auto"`: the largest power of two whose
intermediates fit a budget read off `fn`'s jaxpr (on CPU a few MiB, so each chunk's activations
stay in cache). `lmc`, `fusion` and `align.curves` use it for every batch of points.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["AUTO", "Chunk", "check_chunk", "intermediate_bytes", "auto_chunk", "map_points"]


AUTO = "auto"


Chunk = int | str | None


# Scratch memory one chunk of points may use when ``chunk="auto"``. On CPU the fastest chunk is
# the one whose intermediates stay in cache: a big vmapped batch of models turns every matmul
# into a batched matmul whose activations stream through DRAM, and XLA:CPU runs the batch
# elements of such a dot one after another on one core, while ``lax.map`` over small chunks
# keeps plain (multi-threaded) matmuls and still pays no per-point dispatch. Measured on the
# MNIST-1D MLPs of benchmarks/lmc.py (2 cores): best chunk ~5 at width 32, ~1 at width 128; a
# 4 MiB budget picks both. Accelerators have the memory bandwidth and parallelism to evaluate
# everything at once, so their budget only bounds memory.
AUTO_CHUNK_BYTES = {"cpu": 4 << 20}


AUTO_CHUNK_BYTES_ACCELERATOR = 1 << 30


def check_chunk(chunk: Chunk) -> Chunk:
    """Checks a `chunk` argument of the map/path functions; returns it in canonical form.

    Args:
      chunk: ``None`` (every point at once), ``"auto"`` (sized from memory, :func:`auto_chunk`)
        or a positive integer (that many points at a time).

    Returns:
      `chunk` as ``None``, ``"auto"`` or a Python ``int`` (hashable: the program caches key on it).

    Raises:
      ValueError: anything else (0, negative, a float, a bool, another string).

    Examples:
      >>> import numpy as np
      >>> check_chunk(np.int64(4)), check_chunk(None), check_chunk("auto")
      (4, None, 'auto')
    """
    if chunk is None or (isinstance(chunk, str) and chunk == AUTO):
        return chunk
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, None (all points at once) or 'auto'; got {chunk!r}.")
    return int(chunk)


def _sub_jaxprs(value: Any) -> list[Any]:
    if hasattr(value, "eqns"):
        return [value]
    if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        return [value.jaxpr]
    if isinstance(value, (list, tuple)):
        return [j for v in value for j in _sub_jaxprs(v)]
    return []


def intermediate_bytes(jaxpr: Any) -> int:
    """Bytes of every value a jaxpr computes (an upper bound on its scratch memory).

    A sub-program (a ``scan``/``while`` body, the branches of a ``cond``, a nested ``jit``)
    counts once, at its largest: its buffers are reused across iterations.

    Args:
      jaxpr: a ``Jaxpr`` (``jax.make_jaxpr(f)(*args).jaxpr``).

    Returns:
      The byte count, an int.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> intermediate_bytes(jax.make_jaxpr(lambda x: jnp.sin(x) * 2)(jnp.ones(10)).jaxpr)
      80
    """
    total = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = getattr(var, "aval", None)
            if hasattr(aval, "shape") and hasattr(aval, "dtype"):
                total += int(np.prod(aval.shape, dtype=np.int64)) * aval.dtype.itemsize  # PRNG key dtypes too
        subs = [j for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if subs:
            total += max(intermediate_bytes(j) for j in subs)
    return total


def auto_chunk(fn: Callable[[Any], Any], xs: Any, *, budget_bytes: int | None = None) -> int:
    """How many points of ``fn`` over ``xs`` (mapped over the leading axis) to evaluate at once.

    Traces ``fn`` on one point (no compilation), counts the bytes of its intermediates
    (:func:`intermediate_bytes`) and fits as many points as ``budget_bytes`` holds (default
    :data:`AUTO_CHUNK_BYTES` for the backend): at least 1, at most the number of points.

    Args:
      fn: the function of one point.
      xs: the points: a pytree of arrays with a shared leading axis.
      budget_bytes: scratch bytes one chunk may use; default by backend (4 MiB on CPU, where a
        cache-sized chunk is fastest; 1 GiB on accelerators, where it only bounds memory).

    Returns:
      The chunk size, an int in [1, number of points].

    Examples:
      >>> import jax.numpy as jnp
      >>> auto_chunk(lambda v: jnp.outer(v, v).sum(), jnp.ones((100, 256)), budget_bytes=1 << 20)
      3
    """
    n = int(jax.tree.leaves(xs)[0].shape[0])
    one = jax.tree.map(lambda v: v[0], xs)
    per_point = intermediate_bytes(jax.make_jaxpr(fn)(one).jaxpr)
    if budget_bytes is None:
        budget_bytes = AUTO_CHUNK_BYTES.get(jax.default_backend(), AUTO_CHUNK_BYTES_ACCELERATOR)
    return int(max(1, min(n, budget_bytes // max(per_point, 1))))


def map_points(fn: Callable[[Any], Any], xs: Any, chunk: Chunk = AUTO) -> Any:
    """``fn`` over the leading axis of ``xs``: one ``vmap``, or ``lax.map`` over chunks of points.

    ``chunk=None`` vmaps every point at once; an integer k evaluates k points at a time (same
    numbers, memory bounded by k points); ``"auto"`` picks k with :func:`auto_chunk` when the
    program is traced (so once per compilation). Used by every path, table and curve evaluation.

    Args:
      fn: the function of one point.
      xs: the points: a pytree of arrays with a shared leading axis.
      chunk: None, a positive int or ``"auto"``.

    Returns:
      ``fn``'s outputs stacked on a leading axis, as ``jax.vmap(fn)(xs)`` would return them.

    Examples:
      >>> import jax.numpy as jnp
      >>> map_points(lambda v: v.sum(), jnp.arange(6.0).reshape(3, 2), chunk=2).tolist()
      [1.0, 5.0, 9.0]
    """
    n = int(jax.tree.leaves(xs)[0].shape[0])
    if chunk == AUTO:
        chunk = auto_chunk(fn, xs)
    if chunk is None or chunk >= n:
        return jax.vmap(fn)(xs)
    if chunk == 1:
        return jax.lax.map(fn, xs)
    return jax.lax.map(fn, xs, batch_size=int(chunk))
