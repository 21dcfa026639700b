"""Linear mode connectivity: interpolation paths vmapped over α, barriers, pairwise tables, fusion.

Definitions (as in the papers; see DESIGN.md). With θ_α = (1 − α) θ_A + α θ_B,

* loss barrier     B_L = max_α [ L(θ_α) − ((1 − α) L(θ_A) + α L(θ_B)) ]
* accuracy barrier B_A = max_α [ ((1 − α) Acc(θ_A) + α Acc(θ_B)) − Acc(θ_α) ]

Both are ≥ 0 because the endpoints contribute 0. "Avg. Acc." is the mean accuracy of the two
endpoints and "Interp. Acc." the accuracy at α = 0.5 (the paper's Figure 2). Multi-model fusion
is the uniform (or weighted) average of K models against the mean of their individual metrics.

Every function is pure and takes an ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one
model (``tna_jax.evaluation.make_eval_fn``). α is a batch axis: a path is ``jax.vmap`` over α of
"interpolate, then evaluate", chunked with ``jax.lax.map(..., batch_size=chunk)`` to bound memory
(and, on CPU, to keep each chunk's activations in cache: ``chunk="auto"``, the default); a table over N seeds is a vmap over pairs. α outside [0, 1] is allowed and means
extrapolation along the same line (θ_α for α < 0 lies beyond A, for α > 1 beyond B); barriers are
still measured against the chord between the α = 0 and α = 1 points of the path.

Layer-wise LMC (Adilova et al., 2024) interpolates one group of layers at a time and keeps the
rest at A: θ_α^G = A + α · 1_G ⊙ (B − A). Groups are per-leaf boolean masks stacked on a leading
group axis, so all groups and all α are ONE vmapped, compiled program. The cumulative variants
interpolate the first k groups ("from_input") or the last k groups ("from_output").

Networks with BatchNorm: the running statistics of θ_α are not the statistics of θ_α's
activations (variance collapse, Jordan et al. 2023, "REPAIR"). :func:`reset_bn_stats`
recomputes them from data and :func:`with_bn_reset` wraps an ``eval_fn`` so that every point of
a path is evaluated after the reset (still vmappable over α).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import anchors
from tna_jax import tree as tree_lib

PyTree = Any
EvalFn = Callable[[PyTree, jax.Array, jax.Array], dict[str, jax.Array]]

__all__ = [
    "interpolate", "default_alphas", "lmc_path", "barriers", "all_pairs", "disjoint_pairs", "random_pairs",
    "select_pairs", "describe_pairs", "PAIR_MODES", "pairwise_barriers", "fuse",
    "check_compatible", "check_data", "layer_groups", "layerwise_lmc", "LAYERWISE_MODES",
    "reset_bn_stats", "with_bn_reset", "map_points", "check_chunk", "auto_chunk", "intermediate_bytes", "AUTO",
]


MAX_ALPHAS = 1_000_000  # points on one path; far more than any plot needs, far less than memory
MAX_ALL_PAIRS = 10_000_000


def default_alphas(num: int = 25) -> np.ndarray:
    """``num`` evenly spaced α in [0, 1] (25 by default, as in the paper's plots).

    Args:
      num: number of points (at least 2, so that both endpoints are on the grid).

    Returns:
      A float64 NumPy vector from 0 to 1.

    Raises:
      ValueError: `num` is not an integer >= 2.

    Examples:
      >>> default_alphas(5).tolist()
      [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or not 2 <= num <= MAX_ALPHAS:
        raise ValueError(f"num_alphas must be an integer in [2, {MAX_ALPHAS}]; got {num!r}.")
    return np.linspace(0.0, 1.0, int(num))


def check_compatible(a: PyTree, b: PyTree) -> None:
    """Raises ValueError naming the first path where two models' variables differ in structure
    or shape (e.g. a width-64 and a width-128 MLP, or a model with and without BatchNorm).

    Args:
      a, b: the variables of the two models.

    Raises:
      ValueError: the structures or shapes differ (the message names the path).

    Examples:
      >>> import jax.numpy as jnp
      >>> check_compatible({"w": jnp.ones(2)}, {"w": jnp.zeros(2)})
      >>> try:
      ...     check_compatible({"w": jnp.ones(2)}, {"w": jnp.ones(3)})
      ... except ValueError as err:
      ...     print(err)
      model a and model b differ in shape at path 'w': (2,) vs (3,).
    """
    tree_lib.check_same_structure(a, b, names=("model a", "model b"))
    for name, leaf in tree_lib.named_leaves(a):
        if isinstance(leaf, (str, bytes)) or not (hasattr(leaf, "dtype") or isinstance(leaf, (int, float))):
            raise TypeError(f"model variables must be arrays; model a has {type(leaf).__name__} {leaf!r:.40} at "
                            f"path {name!r}.")


def check_data(data: tuple[jax.Array, jax.Array], name: str = "data") -> tuple[jax.Array, jax.Array]:
    """Checks that `data` is a non-empty pair ``(x, y)`` of equal length; returns it.

    Args:
      data: the pair ``(inputs, labels)``.
      name: what to call it in error messages.

    Returns:
      ``(x, y)``.

    Raises:
      TypeError: `data` is not a pair.
      ValueError: no examples, or x and y of different lengths.

    Examples:
      >>> import numpy as np
      >>> x, y = check_data((np.zeros((3, 2)), np.zeros(3)))
      >>> try:
      ...     check_data((np.zeros((3, 2)), np.zeros(2)), "test data")
      ... except ValueError as err:
      ...     print(err)
      test data x and y differ in length: 3 vs (2,).
    """
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise TypeError(f"{name} must be a pair (x, y); got {type(data).__name__}.")
    x, y = data
    if np.ndim(x) == 0 or np.shape(x)[0] == 0:
        raise ValueError(f"{name} is empty: x has shape {np.shape(x)}; at least one example is needed.")
    if np.ndim(y) == 0 or np.shape(x)[0] != np.shape(y)[0]:
        raise ValueError(f"{name} x and y differ in length: {np.shape(x)[0]} vs {np.shape(y)[:1]}.")
    return x, y


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


def _check_alphas(alphas: Any) -> jax.Array:
    """The α grid as a float32 vector (default 25 points in [0, 1]); any finite values allowed."""
    arr = default_alphas() if alphas is None else alphas
    if not isinstance(arr, jax.core.Tracer):
        try:
            host = np.asarray(arr, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"alphas must be a 1-D sequence of numbers; got {type(arr).__name__} {arr!r:.60}.") from None
        if host.ndim != 1 or host.shape[0] == 0:
            raise ValueError(f"alphas must be a non-empty 1-D sequence; got shape {host.shape}.")
        with np.errstate(over="ignore"):
            finite = np.isfinite(host.astype(np.float32)).all()
        if not finite:
            raise ValueError(f"alphas must be finite (in float32); got {host.tolist()[:8]}.")
    return jnp.asarray(arr, jnp.float32)


def interpolate(a: PyTree, b: PyTree, alpha: float | jax.Array) -> PyTree:
    """θ_α = (1 − α) a + α b over whole variable trees (params and BatchNorm statistics).

    Computed as ``(1 − α) a + α b`` (:func:`tna_jax.tree.lerp`), so α = 0 returns `a` and α = 1
    returns `b` exactly for finite float leaves. Integer leaves are taken from `a` for α < 0.5
    and from `b` otherwise. α outside [0, 1] extrapolates along the same line.

    Args:
      a, b: the variables of the two models (same structure).
      alpha: the weight of `b` (a number or a traced scalar).

    Returns:
      The variables θ_α, with the structure and dtypes of `a`.

    Examples:
      >>> import jax.numpy as jnp
      >>> interpolate({"w": jnp.zeros(2)}, {"w": jnp.full(2, 4.0)}, 0.25)["w"].tolist()
      [1.0, 1.0]
    """
    return tree_lib.lerp(a, b, alpha)


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


@functools.lru_cache(maxsize=64)
def _path_program(eval_fn: EvalFn, chunk: Chunk, jit: bool) -> Callable[..., Any]:
    """One compiled program per (eval_fn, chunk): repeated paths reuse it (no recompiles)."""

    def compute(a, b, alphas, x, y):
        return map_points(lambda alpha: eval_fn(interpolate(a, b, alpha), x, y), alphas, chunk)

    return jax.jit(compute) if jit else compute


def lmc_path(eval_fn: EvalFn, a: PyTree, b: PyTree, alphas: Sequence[float] | jax.Array | None = None,
             data: tuple[jax.Array, jax.Array] | None = None, chunk: Chunk = AUTO, *,
             jit: bool = True) -> dict[str, Any]:
    """Loss and accuracy of θ_α = (1 − α) θ_A + α θ_B for every α, vmapped over α.

    Args:
      eval_fn: ``eval_fn(variables, x, y) -> {"loss", "accuracy"}`` for one model
        (:func:`tna_jax.evaluation.make_eval_fn`; wrap it with :func:`with_bn_reset` to reset
        BatchNorm statistics at every α).
      a, b: the endpoint variables (same structure).
      alphas: the α grid; default 25 points in [0, 1]. Values outside [0, 1] extrapolate.
      data: ``(x, y)`` to evaluate on.
      chunk: evaluate at most this many α at once (``lax.map`` with ``batch_size``: bounds
        memory, same numbers); None = all α in one vmap; ``"auto"`` (default) sizes the chunks
        to the backend (:func:`auto_chunk`: cache-sized on CPU, memory-bounded elsewhere).
      jit: compile the path (cached per ``(eval_fn, chunk)``); False runs it eagerly, e.g.
        inside another transformation.

    Returns:
      ``{"alpha": (K,), "loss": (K,), "accuracy": (K,)}`` as jax arrays.

    Raises:
      ValueError: models of different structure (naming the first mismatching path), empty
        data, chunk < 1, an empty or non-finite α grid.
      TypeError: data that is not a pair ``(x, y)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):
      ...     loss = jnp.mean((x * v["w"] - y) ** 2)
      ...     return {"loss": loss, "accuracy": (loss < 0.5).astype(jnp.float32)}
      >>> data = (jnp.ones(4), jnp.ones(4))
      >>> path = lmc_path(eval_fn, {"w": jnp.array(0.0)}, {"w": jnp.array(2.0)}, [0.0, 0.5, 1.0], data)
      >>> path["loss"].tolist()
      [1.0, 0.0, 1.0]
    """
    if data is None:
        raise ValueError("lmc_path needs data=(x, y) to evaluate on; got None.")
    if not callable(eval_fn):
        raise TypeError(f"eval_fn must be a function eval_fn(variables, x, y); got {type(eval_fn).__name__}.")
    x, y = check_data(data)
    chunk = check_chunk(chunk)
    check_compatible(a, b)
    alphas = _check_alphas(alphas)
    out = _path_program(eval_fn, chunk, bool(jit))(a, b, alphas, x, y)
    return {"alpha": alphas, "loss": out["loss"], "accuracy": out["accuracy"]}


def barriers(path: dict[str, Any]) -> dict[str, float]:
    """Barriers and summary numbers of one path (the output of :func:`lmc_path`).

    The path must contain α = 0 and α = 1 (the endpoints). Accuracy at α = 0.5 is read off the
    path (linearly interpolated if 0.5 is not on the grid).

    Args:
      path: ``{"alpha", "loss", "accuracy"}`` vectors of one path (any order of α).

    Returns:
      ``{"loss_barrier", "accuracy_barrier", "avg_endpoint_accuracy", "interp_accuracy",
      "avg_endpoint_loss", "interp_loss", "argmax_alpha_loss", "argmax_alpha_accuracy"}``.

    Raises:
      ValueError: a path without the keys "alpha", "loss", "accuracy" of one length, or
        without the endpoints.

    Examples:
      >>> path = {"alpha": [0.0, 0.5, 1.0], "loss": [0.2, 1.0, 0.4], "accuracy": [0.9, 0.5, 0.7]}
      >>> b = barriers(path)
      >>> round(b["loss_barrier"], 3), round(b["accuracy_barrier"], 3), round(b["interp_accuracy"], 3)
      (0.7, 0.3, 0.5)
    """
    if not isinstance(path, dict) or any(k not in path for k in ("alpha", "loss", "accuracy")):
        raise ValueError("path must be a dict with 'alpha', 'loss' and 'accuracy' (the output of lmc_path); got "
                         f"{sorted(path) if isinstance(path, dict) else type(path).__name__}.")
    try:
        alpha, loss, acc = (np.asarray(path[k], np.float64) for k in ("alpha", "loss", "accuracy"))
    except (TypeError, ValueError):
        raise ValueError("path['alpha'], path['loss'] and path['accuracy'] must be numeric arrays.") from None
    if alpha.ndim != 1 or loss.shape != alpha.shape or acc.shape != alpha.shape:
        raise ValueError(f"path arrays must be 1-D of one length; got alpha {alpha.shape}, loss {loss.shape}, "
                         f"accuracy {acc.shape}.")
    i0 = np.where(np.isclose(alpha, 0.0))[0]
    i1 = np.where(np.isclose(alpha, 1.0))[0]
    if not len(i0) or not len(i1):
        raise ValueError("barriers() needs a path that contains alpha = 0 and alpha = 1 (the endpoints); "
                         f"got alphas {alpha.tolist()}.")
    la, lb, aa, ab = loss[i0[0]], loss[i1[0]], acc[i0[0]], acc[i1[0]]
    loss_gap = loss - ((1 - alpha) * la + alpha * lb)
    acc_gap = ((1 - alpha) * aa + alpha * ab) - acc
    order = np.argsort(alpha)
    return {
        "loss_barrier": float(max(loss_gap.max(), 0.0)),
        "accuracy_barrier": float(max(acc_gap.max(), 0.0)),
        "avg_endpoint_accuracy": float((aa + ab) / 2),
        "interp_accuracy": float(np.interp(0.5, alpha[order], acc[order])),
        "avg_endpoint_loss": float((la + lb) / 2),
        "interp_loss": float(np.interp(0.5, alpha[order], loss[order])),
        "argmax_alpha_loss": float(alpha[int(np.argmax(loss_gap))]),
        "argmax_alpha_accuracy": float(alpha[int(np.argmax(acc_gap))]),
    }


def all_pairs(n: int, max_pairs: int | None = None) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, of n models in a fixed order, at most `max_pairs` of them.

    Args:
      n: number of models.
      max_pairs: keep the first this many pairs (None or 0: all n (n − 1) / 2).

    Returns:
      A list of ``(i, j)`` tuples, ordered by i, then j.

    Raises:
      ValueError / TypeError: `n` not an integer >= 0, `max_pairs` not a positive integer (or
        None/0 for all), or more than ``MAX_ALL_PAIRS`` pairs asked for.

    Examples:
      >>> all_pairs(3)
      [(0, 1), (0, 2), (1, 2)]
      >>> all_pairs(4, max_pairs=2)
      [(0, 1), (0, 2)]
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise TypeError(f"n must be a non-negative integer; got {type(n).__name__} {n!r}.")
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, (int, np.integer))
                                  or max_pairs < 0):
        raise TypeError(f"max_pairs must be a positive integer or None; got {type(max_pairs).__name__} {max_pairs!r}.")
    total = n * (n - 1) // 2
    wanted = min(total, max_pairs) if max_pairs else total
    if wanted > MAX_ALL_PAIRS:
        raise ValueError(f"all_pairs({n}) asks for {wanted} pairs (more than {MAX_ALL_PAIRS}); pass max_pairs.")
    pairs = ((i, j) for i in range(n) for j in range(i + 1, n))
    return list(itertools.islice(pairs, wanted))


PAIR_MODES = ("all", "disjoint", "random")


def disjoint_pairs(n: int) -> list[tuple[int, int]]:
    """``(0, 1), (2, 3), ...``: ⌊n/2⌋ pairs of n models that share no model.

    Barriers of disjoint pairs are independent draws (for independent seeds), so their sample
    standard deviation estimates the spread of a barrier; overlapping pairs (`all_pairs`)
    are correlated, and their standard deviation understates it.

    Args:
      n: number of models.

    Returns:
      A list of ``(2k, 2k + 1)`` tuples; the last model is left out when `n` is odd.

    Raises:
      TypeError: `n` not an integer >= 0.
      ValueError: more than ``MAX_ALL_PAIRS`` pairs.

    Examples:
      >>> disjoint_pairs(5)
      [(0, 1), (2, 3)]
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise TypeError(f"n must be a non-negative integer; got {type(n).__name__} {n!r}.")
    if n // 2 > MAX_ALL_PAIRS:
        raise ValueError(f"disjoint_pairs({n}) asks for {n // 2} pairs (more than {MAX_ALL_PAIRS}).")
    return [(2 * k, 2 * k + 1) for k in range(int(n) // 2)]


def random_pairs(n: int, num: int, seed: int = 0) -> list[tuple[int, int]]:
    """`num` pairs (i, j), i < j, drawn without replacement from all pairs of n models, sorted.

    Args:
      n: number of models.
      num: how many pairs (all of them when `num` >= n (n − 1) / 2).
      seed: the NumPy seed of the draw (the same seed gives the same pairs).

    Returns:
      A sorted list of distinct ``(i, j)`` tuples.

    Raises:
      TypeError: `n`, `num` or `seed` not a non-negative integer.
      ValueError: more than ``MAX_ALL_PAIRS`` pairs asked for, more than ``MAX_ALL_PAIRS`` models,
        or a seed NumPy does not take (>= 2**128).

    Examples:
      >>> random_pairs(5, 3, seed=0)
      [(1, 3), (1, 4), (3, 4)]
      >>> random_pairs(3, 10) == all_pairs(3)
      True
    """
    for name, v in (("n", n), ("num", num), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise TypeError(f"{name} must be a non-negative integer; got {type(v).__name__} {v!r}.")
    total = int(n) * (int(n) - 1) // 2
    if num >= total:
        return all_pairs(n)
    if num > MAX_ALL_PAIRS or n > MAX_ALL_PAIRS or seed >= 2**128:
        raise ValueError(f"random_pairs(n={n}, num={num}, seed={seed}): at most {MAX_ALL_PAIRS} models and pairs, "
                         "and a seed below 2**128.")
    flat = np.sort(np.random.default_rng(int(seed)).choice(total, size=int(num), replace=False))
    starts = np.array([i * n - i * (i + 1) // 2 for i in range(n)], np.int64)  # index of pair (i, i + 1)
    rows = np.searchsorted(starts, flat, side="right") - 1
    return [(int(i), int(i + 1 + f - starts[i])) for i, f in zip(rows, flat)]


def select_pairs(n: int, mode: str = "all", max_pairs: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """The seed pairs of n models that an LMC analysis measures (``config.analysis.pairs``).

    Args:
      n: number of models.
      mode: ``"all"`` (every pair i < j in order, the first `max_pairs` of them: pairs share
        models), ``"disjoint"`` (`disjoint_pairs`, at most `max_pairs`) or ``"random"``
        (`random_pairs`: `max_pairs` of all pairs, drawn with `seed`).
      max_pairs: the cap (None or 0: none; ``"random"`` then takes all pairs).
      seed: the draw of ``"random"``.

    Returns:
      The list of ``(i, j)`` tuples.

    Raises:
      ValueError: an unknown `mode`.
      TypeError: bad `n`, `max_pairs` or `seed`.

    Examples:
      >>> select_pairs(6, "disjoint"), select_pairs(6, "all", max_pairs=3)
      ([(0, 1), (2, 3), (4, 5)], [(0, 1), (0, 2), (0, 3)])
      >>> select_pairs(6, "random", max_pairs=3, seed=1)
      [(1, 3), (1, 4), (2, 5)]
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"pairs mode must be one of {PAIR_MODES}; got {mode!r}.")
    if mode == "all":
        return all_pairs(n, max_pairs)
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, (int, np.integer))
                                  or max_pairs < 0):
        raise TypeError(f"max_pairs must be a positive integer or None; got {type(max_pairs).__name__} {max_pairs!r}.")
    if mode == "disjoint":
        pairs = disjoint_pairs(n)
        return pairs[:max_pairs] if max_pairs else pairs
    return random_pairs(n, int(max_pairs) if max_pairs else MAX_ALL_PAIRS, seed)


def describe_pairs(mode: str, num_pairs: int, n: int, seed: int = 0) -> str:
    """How a set of pairs from `select_pairs` was chosen, for tables and captions.

    Args:
      mode: the mode given to `select_pairs`.
      num_pairs: the pairs it returned.
      n: the number of models.
      seed: the seed of ``"random"``.

    Returns:
      E.g. ``"5 disjoint pairs"``, ``"all 6 pairs (overlapping)"``, ``"the first 10 of 28 pairs
      (in order, overlapping)"`` or ``"10 random pairs of 45 (pairs_seed 0)"``.

    Examples:
      >>> describe_pairs("disjoint", 5, 10), describe_pairs("all", 10, 8)
      ('5 disjoint pairs', 'the first 10 of 28 pairs (in order, overlapping)')
    """
    total = n * (n - 1) // 2
    if mode == "disjoint":
        return f"{num_pairs} disjoint pair{'s' if num_pairs != 1 else ''}"
    if mode == "random" and num_pairs < total:
        return f"{num_pairs} random pairs of {total} (pairs_seed {seed})"
    if num_pairs < total:
        return f"the first {num_pairs} of {total} pairs (in order, overlapping)"
    if num_pairs == 1:
        return "1 pair"
    return f"all {num_pairs} pairs (overlapping)"


@functools.lru_cache(maxsize=64)
def _pairs_program(eval_fn: EvalFn, chunk: Chunk, jit: bool) -> Callable[..., Any]:
    def compute(stacked, ii, jj, pi, al, x, y):
        def point(inputs):
            p, alpha = inputs
            a = tree_lib.index(stacked, ii[p])
            b = tree_lib.index(stacked, jj[p])
            return eval_fn(interpolate(a, b, alpha), x, y)

        return map_points(point, (pi, al), chunk)

    return jax.jit(compute) if jit else compute


def pairwise_barriers(eval_fn: EvalFn, stacked: PyTree, data: tuple[jax.Array, jax.Array], *,
                      pairs: Sequence[tuple[int, int]] | None = None,
                      alphas: Sequence[float] | None = None, chunk: Chunk = AUTO,
                      jit: bool = True) -> dict[str, Any]:
    """LMC between pairs of N stacked models, vmapped over pairs and α.

    Args:
      eval_fn: evaluation of one model.
      stacked: variables of N models with a leading model axis.
      data: ``(x, y)``.
      pairs: which (i, j) to compare; default all i < j.
      alphas: the α grid (default 25 points in [0, 1]).
      chunk: evaluate at most this many (pair, α) points at once; None = all, ``"auto"``
        (default) as in :func:`lmc_path`.

    Returns:
      ``{"pairs": [(i, j)...], "paths": {"alpha", "loss" (P, K), "accuracy" (P, K)},
      "per_pair": [barriers dicts], "loss_barrier": (N, N), "accuracy_barrier": (N, N)}``
      where the N×N tables are symmetric with NaN where a pair was not evaluated and 0 on the
      diagonal.

    Raises:
      ValueError: empty data, no pairs, a pair out of range, chunk < 1, a bad α grid.
      TypeError: data that is not a pair ``(x, y)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):
      ...     loss = jnp.mean((x * v["w"] - y) ** 2)
      ...     return {"loss": loss, "accuracy": (loss < 0.5).astype(jnp.float32)}
      >>> stacked = {"w": jnp.array([0.0, 2.0, 1.0])}
      >>> table = pairwise_barriers(eval_fn, stacked, (jnp.ones(4), jnp.ones(4)), alphas=[0.0, 0.5, 1.0])
      >>> table["pairs"], float(table["loss_barrier"][0, 1])  # a convex loss: no barrier
      ([(0, 1), (0, 2), (1, 2)], 0.0)
    """
    x, y = check_data(data)
    chunk = check_chunk(chunk)
    leaves = jax.tree.leaves(stacked)
    if not leaves:
        raise ValueError("stacked has no arrays.")
    n = int(np.shape(leaves[0])[0])
    pairs = list(pairs) if pairs is not None else all_pairs(n)
    if not pairs:
        raise ValueError(f"pairwise_barriers needs at least one pair; got none for {n} models.")
    for i, j in pairs:
        if not (0 <= i < n and 0 <= j < n):
            raise ValueError(f"pair ({i}, {j}) is out of range for {n} models.")
    alphas_arr = _check_alphas(alphas)
    ii = jnp.asarray([p[0] for p in pairs], jnp.int32)
    jj = jnp.asarray([p[1] for p in pairs], jnp.int32)
    k = alphas_arr.shape[0]
    # Flatten (pair, α) into one batch axis so chunking bounds the total work in flight.
    pi = jnp.repeat(jnp.arange(len(pairs), dtype=jnp.int32), k)
    al = jnp.tile(alphas_arr, len(pairs))
    out = _pairs_program(eval_fn, chunk, bool(jit))(stacked, ii, jj, pi, al, x, y)
    loss = np.asarray(out["loss"]).reshape(len(pairs), k)
    acc = np.asarray(out["accuracy"]).reshape(len(pairs), k)
    per_pair = [barriers({"alpha": alphas_arr, "loss": loss[p], "accuracy": acc[p]}) for p in range(len(pairs))]
    lb = np.full((n, n), np.nan)
    ab = np.full((n, n), np.nan)
    np.fill_diagonal(lb, 0.0)
    np.fill_diagonal(ab, 0.0)
    for (i, j), b in zip(pairs, per_pair):
        lb[i, j] = lb[j, i] = b["loss_barrier"]
        ab[i, j] = ab[j, i] = b["accuracy_barrier"]
    return {"pairs": pairs, "paths": {"alpha": np.asarray(alphas_arr), "loss": loss, "accuracy": acc},
            "per_pair": per_pair, "loss_barrier": lb, "accuracy_barrier": ab}


@functools.lru_cache(maxsize=64)
def _eval_programs(eval_fn: EvalFn) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Compiled evaluation of K stacked models and of one model, cached per eval_fn."""
    return jax.jit(jax.vmap(eval_fn, in_axes=(0, None, None))), jax.jit(eval_fn)


def fuse(eval_fn: EvalFn, stacked: PyTree, data: tuple[jax.Array, jax.Array], weights: Any = None
         ) -> dict[str, Any]:
    """Multi-model fusion: the (weighted) average of K models against their individual metrics.

    Args:
      eval_fn: evaluation of one model (``evaluation.make_eval_fn``).
      stacked: K models' variables on a leading axis.
      data: ``(x, y)`` to evaluate on.
      weights: None (uniform) or K non-negative weights.

    Returns:
      ``{"fused": variables, "fused_loss", "fused_accuracy", "individual_loss" (K,),
      "individual_accuracy" (K,), "mean_individual_loss", "mean_individual_accuracy",
      "accuracy_barrier" (mean individual − fused), "loss_barrier" (fused − mean individual)}``.

    Raises:
      ValueError: empty data; weights of the wrong length, negative or all zero.
      TypeError: data that is not a pair ``(x, y)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):
      ...     loss = jnp.mean((x * v["w"] - y) ** 2)
      ...     return {"loss": loss, "accuracy": (loss < 0.5).astype(jnp.float32)}
      >>> out = fuse(eval_fn, {"w": jnp.array([0.0, 2.0])}, (jnp.ones(4), jnp.ones(4)))
      >>> float(out["fused"]["w"]), out["fused_accuracy"], out["mean_individual_accuracy"]
      (1.0, 1.0, 0.0)
    """
    x, y = check_data(data)
    fused = tree_lib.weighted_mean(stacked, weights)
    many, one = _eval_programs(eval_fn)
    ind = many(stacked, x, y)
    f = one(fused, x, y)
    ind_acc = np.asarray(ind["accuracy"], np.float64)
    ind_loss = np.asarray(ind["loss"], np.float64)
    w = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)
    mean_acc = float(np.mean(ind_acc) if w is None else np.sum(w * ind_acc))
    mean_loss = float(np.mean(ind_loss) if w is None else np.sum(w * ind_loss))
    return {
        "fused": fused,
        "fused_loss": float(f["loss"]), "fused_accuracy": float(f["accuracy"]),
        "individual_loss": ind_loss, "individual_accuracy": ind_acc,
        "mean_individual_loss": mean_loss, "mean_individual_accuracy": mean_acc,
        "accuracy_barrier": mean_acc - float(f["accuracy"]),
        "loss_barrier": float(f["loss"]) - mean_loss,
    }


# ---------------------------------------------------------------------------------------------
# Layer-wise LMC (Adilova et al., 2024).
# ---------------------------------------------------------------------------------------------

LAYERWISE_MODES = ("single", "from_input", "from_output")
OTHER_GROUP = "other"
_COLLECTIONS = ("params", "batch_stats")

GroupSpec = str | Sequence[str]


def _strip_collection(names: list[str], tree: PyTree) -> list[str]:
    """Leaf names without the Flax collection ("params/dense_0/kernel" -> "dense_0/kernel")."""
    if isinstance(tree, Mapping) and "params" in tree:
        return [n.split("/", 1)[1] if "/" in n else n for n in names]
    return names


def _layer_of(name: str, layers: set[str]) -> str | None:
    """The weight layer a leaf belongs to: its module, or the layer whose ``<layer>_norm`` it is."""
    module = name.rsplit("/", 1)[0] if "/" in name else ""
    if module in layers:
        return module
    head, _, last = module.rpartition("/")
    for suffix in anchors.NORM_SUFFIXES:
        if last.endswith(suffix) and len(last) > len(suffix):
            base = last[: -len(suffix)]
            base = f"{head}/{base}" if head else base
            if base in layers:
                return base
    return None


def layer_groups(variables: PyTree, groups: Sequence[GroupSpec] | Mapping[str, GroupSpec] | None = None, *,
                 layer_order: Sequence[str] | None = None) -> list[tuple[str, np.ndarray]]:
    """Which leaves of `variables` each group selects: ``[(group name, bool vector), ...]``.

    The bool vectors run over the leaves of `variables` in JAX's flattening order. Names are
    matched without the Flax collection prefix (``"dense_0/kernel"`` for both
    ``params/dense_0/kernel`` and a BatchNorm's ``batch_stats/dense_0_norm/mean``).

    Args:
      variables: one model's variables (``{"params", ["batch_stats"]}``) or a bare params tree.
      groups: None (default): one group per weight layer, in `layer_order` (or
        :func:`tna_jax.tree.module_order` of the params), holding the layer's leaves and those of
        its ``<layer>_norm`` (scale, bias and BatchNorm statistics); leaves of no weight layer
        (positional embeddings, stand-alone LayerNorms) form a last group named ``"other"``.
        Otherwise a sequence (or ``{name: spec}`` mapping) of specs, one group each: a string is
        a regular expression (``re.search`` over the leaf names); a list of strings names layers
        (selecting the layer and its norm) or leaves exactly.
      layer_order: the weight layers from input to output (``net.layer_order()``). Pass it: Flax
        returns params in call order but ``jax.tree.map`` re-sorts dict keys, so after training
        the insertion order may be alphabetical (``block10`` before ``block2``).

    Returns:
      ``[(name, selected), ...]``: one boolean vector over the leaves per group.

    Raises:
      ValueError: a group that selects nothing (naming it and listing the leaves), a bad regex,
        or a layer of `layer_order` that the variables do not hold.
      TypeError: a spec that is neither a string nor a list of strings.

    Examples:
      >>> import jax.numpy as jnp
      >>> v = {"params": {"dense_0": {"kernel": jnp.ones((2, 2))}, "dense_0_norm": {"scale": jnp.ones(2)},
      ...                 "head": {"kernel": jnp.ones((2, 1))}}}
      >>> [(name, sel.tolist()) for name, sel in layer_groups(v)]
      [('dense_0', [True, True, False]), ('head', [False, False, True])]
    """
    full = tree_lib.leaf_names(variables)
    names = _strip_collection(full, variables)
    if not names:
        raise ValueError("variables has no leaves to group.")
    params = variables["params"] if isinstance(variables, Mapping) and "params" in variables else variables
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    out: list[tuple[str, np.ndarray]] = []
    if groups is None:
        layers = list(layer_order) if layer_order is not None else tree_lib.module_order(params)
        layer_set = set(layers)
        owner = [_layer_of(n, layer_set) for n in names]
        for layer in layers:
            sel = np.array([o == layer for o in owner], dtype=bool)
            if not sel.any():
                raise ValueError(f"layer_order names layer {layer!r}, which the variables do not hold; "
                                 f"the leaves are: {shown}.")
            out.append((layer, sel))
        rest = np.array([o is None for o in owner], dtype=bool)
        if rest.any():
            out.append((OTHER_GROUP, rest))
        return out
    items = list(groups.items()) if isinstance(groups, Mapping) else [(None, g) for g in groups]
    if not items:
        raise ValueError("groups must hold at least one group; got an empty sequence.")
    for label, spec in items:
        if isinstance(spec, str):
            try:
                regex = re.compile(spec)
            except re.error as err:
                raise ValueError(f"groups pattern {spec!r} is not a valid regular expression: {err}.") from None
            sel = np.array([regex.search(n) is not None for n in names], dtype=bool)
            label = spec if label is None else label
        elif isinstance(spec, Sequence) and spec and all(isinstance(s, str) for s in spec):
            wanted = list(spec)
            sel = np.zeros(len(names), dtype=bool)
            for w in wanted:
                hit = np.array([n == w or f == w or _layer_of(n, {w}) == w for n, f in zip(names, full)], dtype=bool)
                if not hit.any():
                    raise ValueError(f"groups entry {w!r} names no layer or leaf; the leaves are: {shown}.")
                sel |= hit
            label = "+".join(wanted) if label is None else label
        else:
            raise TypeError("each group must be a regular expression (str) or a non-empty list of layer/leaf "
                            f"names; got {type(spec).__name__} {spec!r}.")
        if not sel.any():
            raise ValueError(f"group {label!r} selects no leaf; the leaves are: {shown}.")
        out.append((str(label), sel))
    return out


def _cumulative(named: list[tuple[str, np.ndarray]], mode: str) -> list[tuple[str, np.ndarray]]:
    if mode == "single":
        return named
    seq = named if mode == "from_input" else named[::-1]
    out, acc = [], np.zeros_like(seq[0][1])
    for k, (name, sel) in enumerate(seq):
        acc = acc | sel
        label = name if k == 0 else (f"{seq[0][0]} .. {name}" if mode == "from_input" else f"{name} .. {seq[0][0]}")
        out.append((label, acc.copy()))
    return out


def _masked_lerp(a: PyTree, b: PyTree, alpha: jax.Array, select: PyTree) -> PyTree:
    """θ = lerp(a, b, α) on the leaves where `select` (one bool scalar per leaf) holds, a elsewhere."""

    def one(x, y, s):
        # α·1[s] is exactly α or 0, so selected leaves get lerp(x, y, α) (the full path's
        # arithmetic, op for op) and the others (1 − 0) x + 0 y = x.
        return tree_lib.lerp(x, y, alpha * s.astype(jnp.float32))

    return jax.tree.map(one, a, b, select)


@functools.lru_cache(maxsize=64)
def _layerwise_program(eval_fn: EvalFn, chunk: Chunk, jit: bool) -> Callable[..., Any]:
    def compute(a, b, masks, gi, al, x, y):
        def point(inputs):
            g, alpha = inputs
            return eval_fn(_masked_lerp(a, b, alpha, tree_lib.index(masks, g)), x, y)

        return map_points(point, (gi, al), chunk)

    return jax.jit(compute) if jit else compute


def layerwise_lmc(eval_fn: EvalFn, a: PyTree, b: PyTree, groups: Sequence[GroupSpec] | Mapping[str, GroupSpec] | None,
                  data: tuple[jax.Array, jax.Array], *, alphas: Sequence[float] | None = None, mode: str = "single",
                  chunk: Chunk = AUTO, layer_order: Sequence[str] | None = None,
                  jit: bool = True) -> dict[str, Any]:
    """Layer-wise linear mode connectivity: interpolate one group of layers, keep the rest at A.

    For a group G with indicator 1_G over the leaves, the path is
    θ_α^G = (1 − α 1_G) ⊙ θ_A + α 1_G ⊙ θ_B, i.e. G's leaves move from A to B and every other
    leaf stays at A. Its barriers (:func:`barriers`) are measured against the chord between its
    own ends, θ_A and "A with G taken from B" (Adilova et al., 2024, "Layer-wise linear mode
    connectivity", ICLR). Modes:

    * ``"single"``: one path per group;
    * ``"from_input"``: path k interpolates groups 0..k (cumulative from the input);
    * ``"from_output"``: path k interpolates the last k + 1 groups (cumulative from the output).

    The last cumulative path interpolates every group; with the default groups (which cover
    every leaf) it is the full LMC path of :func:`lmc_path`, number for number.

    The per-group selections are stacked into a tree of bools with a leading group axis (one
    bool per leaf and group), so all groups and all α are ONE vmapped, compiled program
    (cached per ``(eval_fn, chunk)``: further pairs reuse it).

    Args:
      eval_fn: evaluation of one model (wrap it with :func:`with_bn_reset` for BatchNorm nets).
      a, b: the two models' variables (same structure).
      groups: None for one group per weight layer, or regexes / name lists
        (see :func:`layer_groups`).
      data: ``(x, y)``.
      alphas: the α grid (default 25 points in [0, 1]; values outside extrapolate).
      mode: one of :data:`LAYERWISE_MODES`.
      chunk: evaluate at most this many (group, α) points at once; None = all, ``"auto"``
        (default) as in :func:`lmc_path`.
      layer_order: the weight layers from input to output (``net.layer_order()``).

    Returns:
      ``{"mode", "groups": [names], "members": [[leaf names]], "paths": {"alpha" (K,),
      "loss" (G, K), "accuracy" (G, K)}, "per_group": [barriers dicts], "loss_barrier" (G,),
      "accuracy_barrier" (G,)}``.

    Raises:
      ValueError: different structures (naming the first mismatching path), empty data,
        chunk < 1, an unknown mode, groups that select nothing.

    Examples:
      >>> import jax.numpy as jnp
      >>> def eval_fn(v, x, y):  # loss (w1 w2 - 1)^2; A = (1, 1) and B = (-1, -1) are both minima
      ...     loss = (v["l1"]["kernel"] * v["l2"]["kernel"] - 1.0) ** 2
      ...     return {"loss": loss, "accuracy": (loss < 0.1).astype(jnp.float32)}
      >>> a = {"l1": {"kernel": jnp.array(1.0)}, "l2": {"kernel": jnp.array(1.0)}}
      >>> b = {"l1": {"kernel": jnp.array(-1.0)}, "l2": {"kernel": jnp.array(-1.0)}}
      >>> out = layerwise_lmc(eval_fn, a, b, None, (jnp.zeros(1), jnp.zeros(1)), alphas=[0.0, 0.5, 1.0])
      >>> out["groups"], out["loss_barrier"].tolist()  # each layer alone: convex, no barrier
      (['l1', 'l2'], [0.0, 0.0])
      >>> full = layerwise_lmc(eval_fn, a, b, None, (jnp.zeros(1), jnp.zeros(1)), alphas=[0.0, 0.5, 1.0],
      ...                      mode="from_input")
      >>> full["groups"][-1], full["loss_barrier"].tolist()  # both layers: the full LMC barrier
      ('l1 .. l2', [0.0, 1.0])
    """
    if mode not in LAYERWISE_MODES:
        raise ValueError(f"mode must be one of {LAYERWISE_MODES}; got {mode!r}.")
    if data is None:
        raise ValueError("layerwise_lmc needs data=(x, y) to evaluate on; got None.")
    x, y = check_data(data)
    chunk = check_chunk(chunk)
    check_compatible(a, b)
    alphas_arr = _check_alphas(alphas)
    named = _cumulative(layer_groups(a, groups, layer_order=layer_order), mode)
    leaf_names = tree_lib.leaf_names(a)
    matrix = np.stack([sel for _, sel in named])  # (G, leaves)
    treedef = jax.tree.structure(a)
    masks = treedef.unflatten([jnp.asarray(matrix[:, i]) for i in range(matrix.shape[1])])
    g, k = matrix.shape[0], alphas_arr.shape[0]
    gi = jnp.repeat(jnp.arange(g, dtype=jnp.int32), k)
    al = jnp.tile(alphas_arr, g)
    out = _layerwise_program(eval_fn, chunk, bool(jit))(a, b, masks, gi, al, x, y)
    loss = np.asarray(out["loss"]).reshape(g, k)
    acc = np.asarray(out["accuracy"]).reshape(g, k)
    per_group = [barriers({"alpha": alphas_arr, "loss": loss[i], "accuracy": acc[i]}) for i in range(g)]
    return {
        "mode": mode,
        "groups": [name for name, _ in named],
        "members": [[leaf_names[j] for j in np.flatnonzero(sel)] for _, sel in named],
        "paths": {"alpha": np.asarray(alphas_arr), "loss": loss, "accuracy": acc},
        "per_group": per_group,
        "loss_barrier": np.array([p["loss_barrier"] for p in per_group]),
        "accuracy_barrier": np.array([p["accuracy_barrier"] for p in per_group]),
    }


# ---------------------------------------------------------------------------------------------
# BatchNorm statistics reset (REPAIR / git-re-basin's "reset_bn_stats").
# ---------------------------------------------------------------------------------------------

_MOMENTS = "bn_moments"


def _feature_axes(ndim: int, axis: Any) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axes))


def _capture_moments(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
    """Flax method interceptor: records the mean, the mean of squares and the count of every
    ``nn.BatchNorm``'s input (over its reduction axes) in the ``bn_moments`` collection."""
    import flax.linen as nn

    module = context.module
    if isinstance(module, nn.BatchNorm) and context.method_name == "__call__" and not module.is_initializing():
        x = args[0] if args else kwargs["x"]
        feat = _feature_axes(x.ndim, module.axis)
        red = tuple(i for i in range(x.ndim) if i not in feat)
        x32 = jnp.asarray(x, jnp.float32)
        count = float(np.prod([x.shape[i] for i in red]))
        if module.has_variable(_MOMENTS, "mean"):
            raise ValueError(f"BatchNorm module {'/'.join(module.path)} is called more than once per forward "
                             "pass; reset_bn_stats supports one call per module.")
        module.put_variable(_MOMENTS, "mean", jnp.mean(x32, axis=red))
        module.put_variable(_MOMENTS, "mean_sq", jnp.mean(jnp.square(x32), axis=red))
        module.put_variable(_MOMENTS, "count", jnp.asarray(count, jnp.float32))
    return next_fun(*args, **kwargs)


def _batch_moments(net: Any, variables: PyTree, xb: jax.Array, rng: jax.Array | None) -> PyTree:
    import flax.linen as nn

    with nn.intercept_methods(_capture_moments):
        _, state = net.module.apply(variables, xb, train=True, rngs=None if rng is None else {"dropout": rng},
                                    mutable=["batch_stats", _MOMENTS])
    return state.get(_MOMENTS, {})


def reset_bn_stats(net: Any, variables: PyTree, x: jax.Array, *, batch_size: int = 500,
                   num_batches: int | None = None, variance: str = "population",
                   rng: jax.Array | None = None) -> PyTree:
    """`variables` with every BatchNorm's running statistics recomputed from the inputs `x`.

    The data is cut into ``B = num_batches`` (default: all full batches; the remainder of
    ``len(x) % batch_size`` examples is dropped, one batch of ``len(x)`` when ``len(x) <
    batch_size``) batches of ``n = batch_size`` examples. Each batch goes through the network in
    training mode, so every BatchNorm normalises with the batch's own statistics (exactly like
    PyTorch's ``model.train()`` forward passes in REPAIR's / git-re-basin's ``reset_bn_stats``),
    and for every BatchNorm the batch mean μ_b and mean of squares s_b of its input are recorded
    over its reduction axes (batch and, for convolutions, space: m elements per feature). Then

    * ``mean = (1/B) Σ_b μ_b``,
    * ``variance="population"`` (default): ``var = (1/B) Σ_b s_b − mean²``, the population
      (biased) variance over all B·m inputs — what Flax's BatchNorm stores (it keeps biased
      variances) when the statistics are exact;
    * ``variance="pytorch"``: ``var = (1/B) Σ_b (s_b − μ_b²) · m / (m − 1)``, the average of the
      per-batch unbiased variances: exactly what PyTorch's ``BatchNorm(momentum=None)``
      cumulative moving average holds after B equal batches (``reset_running_stats()`` then one
      pass over the loader), i.e. REPAIR's and git-re-basin's reset.

    Both have the same mean; the variances differ by the law of total variance,
    population = mean of biased batch variances + variance of the batch means, and by the factor
    m / (m − 1): for m ≥ 100 the two agree to about 1 %. With one batch ``population`` is the
    exact batch statistic. Pure and jittable: ``jax.vmap`` over interpolated models (α) works.

    Args:
      net: the :class:`tna_jax.models.Net` (its Flax module must use ``flax.linen.BatchNorm``).
      variables: ``{"params", "batch_stats"}`` of one model (e.g. an interpolated one).
      x: inputs to compute the statistics from (training data, as in the papers).
      batch_size: examples per forward pass (the BatchNorm batch size, as in training).
      num_batches: use only the first this many batches (None = all full batches).
      variance: "population" or "pytorch" (see above).
      rng: dropout key for models with dropout (None = no dropout key).

    Returns:
      `variables` with ``batch_stats`` replaced (params unchanged).

    Raises:
      ValueError: a model without ``batch_stats``, empty `x`, ``batch_size``/``num_batches`` < 1,
        more batches than `x` holds, an unknown `variance`, or batch statistics that no
        ``nn.BatchNorm`` produced.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from tna_jax.models import Net
      >>> class Tiny(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False):
      ...         return nn.BatchNorm(use_running_average=not train, name="bn")(x)
      >>> net = Net("tiny", Tiny(), (1,), 1)
      >>> v = net.init(jax.random.key(0))
      >>> x = jnp.array([[1.0], [3.0], [5.0], [7.0]])
      >>> new = reset_bn_stats(net, v, x, batch_size=2)  # batches {1, 3} and {5, 7}
      >>> new["batch_stats"]["bn"]["mean"].tolist(), new["batch_stats"]["bn"]["var"].tolist()
      ([4.0], [5.0])
      >>> reset_bn_stats(net, v, x, batch_size=2, variance="pytorch")["batch_stats"]["bn"]["var"].tolist()
      [2.0]
    """
    if not isinstance(variables, Mapping) or "batch_stats" not in variables:
        raise ValueError("reset_bn_stats needs variables with 'batch_stats' (a model with BatchNorm); got "
                         f"collections {sorted(variables) if isinstance(variables, Mapping) else type(variables).__name__}.")
    if variance not in ("population", "pytorch"):
        raise ValueError(f"variance must be 'population' or 'pytorch'; got {variance!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}.")
    n = int(np.shape(x)[0]) if np.ndim(x) else 0
    if n == 0:
        raise ValueError(f"x is empty (shape {np.shape(x)}): reset_bn_stats needs at least one example.")
    bs = min(int(batch_size), n)
    available = n // bs
    if num_batches is None:
        nb = available
    elif isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer or None; got {num_batches!r}.")
    elif num_batches > available:
        raise ValueError(f"num_batches={num_batches} exceeds the {available} full batches of {bs} in x "
                         f"({n} examples).")
    else:
        nb = int(num_batches)
    xb = jnp.reshape(jnp.asarray(x)[: nb * bs], (nb, bs, *np.shape(x)[1:]))

    probe = jax.eval_shape(lambda v, x0: _batch_moments(net, v, x0, rng), variables, xb[0])
    stats = variables["batch_stats"]
    stat_modules = {n.rsplit("/", 1)[0] for n in tree_lib.leaf_names(stats)}
    got = {n.rsplit("/", 1)[0] for n in tree_lib.leaf_names(probe)}
    if stat_modules - got:
        missing = sorted(stat_modules - got)[0]
        raise ValueError(f"batch_stats of module {missing!r} were not produced by a flax.linen.BatchNorm "
                         "call in training mode; reset_bn_stats cannot recompute them.")

    is_moments = lambda t: isinstance(t, Mapping) and "mean_sq" in t  # noqa: E731

    def with_batch_var(m: PyTree) -> PyTree:
        # The per-batch unbiased variance (s_b − μ_b²) · m / (m − 1), for variance="pytorch".
        return jax.tree.map(lambda t: {**t, "batch_var": (t["mean_sq"] - jnp.square(t["mean"])) * t["count"]
                                       / jnp.maximum(t["count"] - 1.0, 1.0)}, m, is_leaf=is_moments)

    def body(acc, batch):
        return jax.tree.map(jnp.add, acc, with_batch_var(_batch_moments(net, variables, batch, rng))), None

    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(with_batch_var, probe))
    sums, _ = jax.lax.scan(body, zeros, xb)

    def new_stats(path_stats: Mapping[str, Any], path: str) -> dict[str, Any]:
        node = sums
        for part in path.split("/"):
            node = node[part]
        mean = node["mean"] / nb
        if variance == "population":
            var = jnp.maximum(node["mean_sq"] / nb - jnp.square(mean), 0.0)
        else:
            var = node["batch_var"] / nb
        return {"mean": mean.astype(path_stats["mean"].dtype).reshape(path_stats["mean"].shape),
                "var": var.astype(path_stats["var"].dtype).reshape(path_stats["var"].shape)}

    def rebuild(node: Any, prefix: str) -> Any:
        if isinstance(node, Mapping) and "mean" in node and "var" in node and not isinstance(node["mean"], Mapping):
            return {**node, **new_stats(node, prefix)}
        return {k: rebuild(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in node.items()}

    return {**variables, "batch_stats": rebuild(stats, "")}


def with_bn_reset(net: Any, eval_fn: EvalFn, x_reset: jax.Array, *, batch_size: int = 500,
                  num_batches: int | None = None, variance: str = "population") -> EvalFn:
    """``eval_fn`` that first recomputes BatchNorm statistics from `x_reset` (:func:`reset_bn_stats`).

    Use it in place of `eval_fn` in :func:`lmc_path`, :func:`pairwise_barriers`,
    :func:`layerwise_lmc` or :func:`fuse` to evaluate every interpolated model after a BN
    reset (the "BN reset" variant of LMC in REPAIR and git-re-basin). Endpoints are reset too,
    so the barrier compares like with like. The result is pure and vmappable over α; `x_reset`
    is closed over (a constant of the compiled program).

    Args:
      net: the model (:class:`tna_jax.models.Net`) with BatchNorm.
      eval_fn: evaluation of one model.
      x_reset: the inputs the statistics are recomputed from (training data).
      batch_size, num_batches, variance: as in :func:`reset_bn_stats`.

    Returns:
      ``eval_fn(variables, x, y)`` with the reset applied to `variables` first.

    Raises:
      ValueError: `net` has no BatchNorm statistics, or `x_reset` is empty.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from tna_jax.models import Net
      >>> class Tiny(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, x, train=False):
      ...         return nn.BatchNorm(use_running_average=not train, name="bn")(x)
      >>> net = Net("tiny", Tiny(), (1,), 1)
      >>> def eval_fn(v, x, y):  # reports the running mean it evaluates with
      ...     return {"loss": v["batch_stats"]["bn"]["mean"][0], "accuracy": jnp.float32(1.0)}
      >>> reset_eval = with_bn_reset(net, eval_fn, jnp.array([[2.0], [4.0]]), batch_size=2)
      >>> float(reset_eval(net.init(jax.random.key(0)), None, None)["loss"])
      3.0
    """
    if not getattr(net, "has_batch_stats", False):
        raise ValueError(f"with_bn_reset needs a net with BatchNorm statistics; {getattr(net, 'name', net)!r} has none.")
    if np.ndim(x_reset) == 0 or np.shape(x_reset)[0] == 0:
        raise ValueError(f"x_reset is empty (shape {np.shape(x_reset)}): at least one example is needed.")
    x_reset = jnp.asarray(x_reset)

    def reset_eval(variables: PyTree, x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
        fresh = reset_bn_stats(net, variables, x_reset, batch_size=batch_size, num_batches=num_batches,
                               variance=variance)
        return eval_fn(fresh, x, y)

    return reset_eval
