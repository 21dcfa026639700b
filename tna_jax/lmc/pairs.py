"""Pairs of seeds and the pairwise barrier table: every pair, disjoint pairs or a seeded random
subset, and all of a table's paths as one vmapped program."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import deprecation
from tna_jax import tree as tree_lib
from tna_jax.chunking import AUTO, Chunk, check_chunk, map_points
from tna_jax.evaluation import EvalFn
from tna_jax.lmc.paths import Barriers, LMCPath, barriers, check_alphas, check_data, interpolate
from tna_jax.programs import cached_per_eval_fn

PyTree = Any

__all__ = ["MAX_ALL_PAIRS", "PAIR_MODES", "PairwiseBarriers", "all_pairs", "disjoint_pairs", "random_pairs",
           "select_pairs", "describe_pairs", "pairs_program", "pairwise_barriers"]


@deprecation.legacy_item_access
class PairwiseBarriers(NamedTuple):
    """LMC between pairs of N models (:func:`pairwise_barriers`).

    Attributes:
      pairs: the P evaluated pairs ``[(i, j), ...]``.
      paths: an :class:`~tna_jax.lmc.paths.LMCPath` with alpha (K,) and loss, accuracy (P, K)
        (NumPy).
      per_pair: P :class:`~tna_jax.lmc.paths.Barriers`, in the order of `pairs`.
      loss_barrier: (N, N) symmetric table, 0 on the diagonal, NaN where no pair was evaluated.
      accuracy_barrier: (N, N) likewise.
    """

    pairs: list[tuple[int, int]]
    paths: LMCPath
    per_pair: list[Barriers]
    loss_barrier: np.ndarray
    accuracy_barrier: np.ndarray


MAX_ALL_PAIRS = 10_000_000


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


@cached_per_eval_fn
def pairs_program(eval_fn: EvalFn, chunk: Chunk, jit: bool = True) -> Callable[..., Any]:
    """The program :func:`pairwise_barriers` runs, cached per ``(eval_fn, chunk, jit)``:
    ``program(stacked, ii, jj, pi, al, x, y) -> {"loss", "accuracy"}`` over the flattened
    (pair, α) points, where point p interpolates models ``ii[pi[p]]`` and ``jj[pi[p]]`` at
    ``al[p]``. Public for memory analysis (``program.lower(...).compile().memory_analysis()``).

    Args:
      eval_fn: evaluation of one model.
      chunk: as in :func:`pairwise_barriers` (a checked, hashable value).
      jit: return the jitted program (default) or the plain function.

    Returns:
      The program.
    """

    def compute(stacked, ii, jj, pi, al, x, y):
        def point(inputs):
            p, alpha = inputs
            a = tree_lib.index(stacked, ii[p])
            b = tree_lib.index(stacked, jj[p])
            return eval_fn(interpolate(a, b, alpha), x, y)

        return map_points(point, (pi, al), chunk)

    return jax.jit(compute) if jit else compute


@cached_per_eval_fn
def _sharded_pairs_program(eval_fn: EvalFn, chunk: Chunk, mesh: Any) -> Callable[..., Any]:
    """:func:`pairs_program` with the (pair, α) points split over `mesh`'s ``"runs"`` axis: each
    device evaluates its own block of points (the models and data replicated to it inside the
    program), so the table is computed by every process's devices, not gathered to one host."""
    from jax.sharding import PartitionSpec as P

    # The unjitted program built here, not fetched from pairs_program's cache: `eval_fn` is this
    # cache's weak stand-in, which that cache would hold only weakly in turn.
    compute = pairs_program.__wrapped__(eval_fn, chunk, False)
    sharded = jax.shard_map(compute, mesh=mesh, in_specs=(P(), P(), P(), P("runs"), P("runs"), P(), P()),
                            out_specs=P("runs"), check_vma=False)
    return jax.jit(sharded)


def _spans_processes(tree: PyTree) -> bool:
    return any(isinstance(leaf, jax.Array) and not leaf.is_fully_addressable for leaf in jax.tree.leaves(tree))


def pairwise_barriers(eval_fn: EvalFn, stacked: PyTree, data: tuple[jax.Array, jax.Array], *,
                      pairs: Sequence[tuple[int, int]] | None = None,
                      alphas: Sequence[float] | None = None, chunk: Chunk = AUTO,
                      jit: bool = True) -> PairwiseBarriers:
    """LMC between pairs of N stacked models, vmapped over pairs and α.

    Args:
      eval_fn: evaluation of one model.
      stacked: variables of N models with a leading model axis.
      data: ``(x, y)``.
      pairs: which (i, j) to compare; default all i < j.
      alphas: the α grid (default 25 points in [0, 1]).
      chunk: evaluate at most this many (pair, α) points at once; None = all, ``"auto"``
        (default) as in :func:`lmc_path`.
      jit: compile the table as one program (False: trace it into the caller's). When `stacked`
        spans several processes' devices (``jax.distributed``), the points are split over every
        device of every process and only the (pairs × α) numbers are gathered.

    Returns:
      :class:`PairwiseBarriers`; its N×N tables are symmetric with NaN where a pair was not
      evaluated and 0 on the diagonal.

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
      >>> table.pairs, float(table.loss_barrier[0, 1])  # a convex loss: no barrier
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
    alphas_arr = check_alphas(alphas)
    ii = jnp.asarray([p[0] for p in pairs], jnp.int32)
    jj = jnp.asarray([p[1] for p in pairs], jnp.int32)
    k = alphas_arr.shape[0]
    # Flatten (pair, α) into one batch axis so chunking bounds the total work in flight.
    pi = jnp.repeat(jnp.arange(len(pairs), dtype=jnp.int32), k)
    al = jnp.tile(alphas_arr, len(pairs))
    if jit and _spans_processes(stacked):
        # Under jax.distributed (models spread over every process's devices): the points are
        # split over the global mesh, padded to a multiple of its size; padding is dropped.
        from jax.sharding import NamedSharding, PartitionSpec

        from tna_jax import distributed
        from tna_jax.sharding import run_mesh

        mesh = run_mesh()
        pad = -len(pi) % mesh.size
        points = NamedSharding(mesh, PartitionSpec("runs"))
        everywhere = NamedSharding(mesh, PartitionSpec())
        pi_g = distributed.global_array(np.pad(np.asarray(pi), (0, pad)), points)
        al_g = distributed.global_array(np.pad(np.asarray(al), (0, pad)), points)
        ii, jj, x, y = (distributed.global_array(a, everywhere) for a in (ii, jj, x, y))
        out = _sharded_pairs_program(eval_fn, chunk, mesh)(stacked, ii, jj, pi_g, al_g, x, y)
        out = {key: distributed.to_host(out[key])[:len(pi)] for key in ("loss", "accuracy")}
    else:
        out = pairs_program(eval_fn, chunk, bool(jit))(stacked, ii, jj, pi, al, x, y)
    loss = np.asarray(out["loss"]).reshape(len(pairs), k)
    acc = np.asarray(out["accuracy"]).reshape(len(pairs), k)
    per_pair = [barriers(LMCPath(alphas_arr, loss[p], acc[p])) for p in range(len(pairs))]
    lb = np.full((n, n), np.nan)
    ab = np.full((n, n), np.nan)
    np.fill_diagonal(lb, 0.0)
    np.fill_diagonal(ab, 0.0)
    for (i, j), b in zip(pairs, per_pair):
        lb[i, j] = lb[j, i] = b.loss_barrier
        ab[i, j] = ab[j, i] = b.accuracy_barrier
    return PairwiseBarriers(pairs=pairs, paths=LMCPath(np.asarray(alphas_arr), loss, acc), per_pair=per_pair,
                            loss_barrier=lb, accuracy_barrier=ab)
