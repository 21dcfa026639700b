"""Aligning many models: to one reference in one call, or to each other (MergeMany).

* `align_to_reference` aligns N models (stacked on a leading axis, e.g. the seeds of one arm of
  `tna_jax.training.fit`) to one reference by weight matching, all N at once: every cost matrix
  is built for the N models in one vmapped, jitted call and their assignment problems are solved
  in threads. The N descents run in lockstep (the paper's random order, the same for all), each
  model skipping the permutations whose inputs did not change, so each model's result is the one
  `weight_matching` would find alone with ``incremental=False``.
* `merge_many` is Git Re-Basin's MergeMany (Ainsworth et al. 2023, Algorithm 3): with no
  privileged reference, each model in turn is weight-matched to the average of the others, until
  a whole round changes nothing; the result is the average of the aligned models, a model soup
  whose ingredients share one permutation of their units:

  $$P_i \\leftarrow \\arg\\max_P \\big\\langle \\tfrac{1}{N-1}\\textstyle\\sum_{j\\ne i} P_j\\theta_j,\\; P\\theta_i \\big\\rangle .$$
"""

from __future__ import annotations

import dataclasses
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import tree as tree_lib
from tna_jax.align import costs as costs_lib
from tna_jax.align.lap import Solver, get_solver, nested_value, solve_assignment, solve_nested
from tna_jax.align.spec import Permutation, PermutationSpec, apply_permutation, identity_permutation
from tna_jax.align.visiting import leaves_out_neighbours
from tna_jax.align.weight_matching import (
    FIRST_SWEEPS,
    MatchResult,
    order_generator,
    select_leaves,
    weight_matching,
)

PyTree = Any

__all__ = ["MergeResult", "merge_many", "align_to_reference"]


class MergeResult(NamedTuple):
    """What `merge_many` returns.

    Attributes:
      perm: ``{name: (N, ...) index array}``: model ``i`` aligned is
        ``apply_permutation(spec, {k: v[i] for k, v in perm.items()}, models[i])``.
      merged: the average of the aligned models (variables of one model).
      iterations: rounds over the models (the last one changed nothing if `converged`).
      converged: whether the last round changed no permutation.
      objective: ``Σ_i ⟨mean of the others, P_i θ_i⟩`` after each round (float64 array).

    Examples:
      >>> MergeResult._fields
      ('perm', 'merged', 'iterations', 'converged', 'objective')
    """

    perm: Permutation
    merged: PyTree
    iterations: int
    converged: bool
    objective: np.ndarray


def _models(models: Any) -> list[PyTree]:
    if isinstance(models, (list, tuple)):
        out = list(models)
    else:
        leaves = jax.tree.leaves(models)
        if not leaves or np.ndim(leaves[0]) < 1:
            raise TypeError("models must be a list of variables or variables stacked on a leading axis.")
        out = tree_lib.unstack(models)
    if len(out) < 2:
        raise ValueError(f"merging needs at least 2 models; got {len(out)}.")
    return out


def merge_many(spec: PermutationSpec, models: Any, key: jax.Array, max_iter: int = 100, *,
               collections: tuple[str, ...] = ("params",), solver: str | Solver = "auto",
               wm_max_iter: int = 100) -> MergeResult:
    """Aligns N models to their common consensus (Git Re-Basin's MergeMany) and averages them.

    Args:
      spec: the models' permutation spec.
      models: a list of N >= 2 variables, or variables stacked on a leading axis.
      key: PRNG key for the order of the models in each round and of the matchings.
      max_iter: at most this many rounds.
      collections: the collections weight matching compares (default the parameters).
      solver: the exact assignment solver (see `tna_jax.align.lap`).
      wm_max_iter: sweeps of each weight matching (warm-started from the model's permutation).

    Returns:
      a `MergeResult` ``(perm, merged, iterations, converged, objective)``.

    Raises:
      TypeError: `models` is neither a list nor stacked variables.
      ValueError: fewer than 2 models, ``max_iter < 1``, or models that do not fit the spec.

    Examples:
      >>> import jax
      >>> from tna_jax import models as zoo
      >>> from tna_jax.align import permutation_spec, random_permutation, apply_permutation
      >>> net = zoo.build({"name": "mlp", "depth": 2, "width": 8}, (12,), 3)
      >>> spec = permutation_spec(net)
      >>> base = net.init(jax.random.key(0))
      >>> copies = [apply_permutation(spec, random_permutation(spec, jax.random.key(i)), base) for i in range(3)]
      >>> res = merge_many(spec, copies, jax.random.key(1))
      >>> first = apply_permutation(spec, {k: v[0] for k, v in res.perm.items()}, copies[0])
      >>> res.converged, bool(jax.numpy.allclose(res.merged["params"]["dense_1"]["kernel"],
      ...                                        first["params"]["dense_1"]["kernel"]))
      (True, True)
    """
    ms = _models(models)
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}.")
    n = len(ms)
    perms = [identity_permutation(spec) for _ in range(n)]
    current = list(ms)
    total = jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *current)
    objective, converged, it = [], False, 0
    for it in range(1, int(max_iter) + 1):
        changed = False
        value = 0.0
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, it), n))
        for i in order:
            i = int(i)
            others = jax.tree.map(lambda t, x: (t - x) / (n - 1), total, current[i])
            res = weight_matching(spec, others, ms[i], jax.random.fold_in(key, 1000 * it + i), max_iter=wm_max_iter,
                                  collections=collections, init=perms[i], solver=solver)
            value += res.objective[-1]
            if any(not np.array_equal(res.perm[k], perms[i][k]) for k in spec.names):
                changed = True
                perms[i] = res.perm
                new = apply_permutation(spec, perms[i], ms[i])
                total = jax.tree.map(lambda t, x, y: t - x + y, total, current[i], new)
                current[i] = new
        objective.append(value)
        if not changed:
            converged = True
            break
    merged = tree_lib.weighted_mean(tree_lib.stack(current))
    stacked = {k: np.stack([np.asarray(p[k]) for p in perms]) for k in spec.names}
    return MergeResult(perm=stacked, merged=merged, iterations=it, converged=converged,
                       objective=np.asarray(objective, np.float64))


@functools.lru_cache(maxsize=256)
def _batched_fn(spec: PermutationSpec, plan: costs_lib.GroupPlan):
    def one(a, b, perm):
        return costs_lib.group_costs(spec, plan, "all", a, b, perm)

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


@functools.lru_cache(maxsize=256)
def _batched_partial_fn(spec: PermutationSpec, plan: costs_lib.GroupPlan, neighbours: frozenset[str]):
    """`_batched_fn` without the terms of the neighbours outside `neighbours` (forward first sweep)."""
    plan = dataclasses.replace(plan, single=tuple((h, ts) for h, ts in plan.single if h in neighbours))

    def one(a, b, perm):
        return costs_lib.group_costs(spec, plan, "terms", a, b, perm)

    return jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))


def align_to_reference(spec: PermutationSpec, a: PyTree, stacked: PyTree, key: jax.Array, max_iter: int = 100, *,
                       collections: tuple[str, ...] = ("params",), tol: float = 1e-9,
                       solver: str | Solver = "auto", threads: int = 2, first_sweep: str = "auto") -> MatchResult:
    """Weight-matches N models (stacked on a leading axis) to the reference `a`, all at once.

    Args:
      spec: the models' permutation spec.
      a: the reference variables.
      stacked: N models' variables stacked on a leading axis (as `tna_jax.tree.stack` makes).
      key: PRNG key for the (shared) visiting order.
      max_iter: at most this many sweeps.
      collections: the collections compared (default the parameters).
      tol: relative improvement needed to replace a permutation (as in `weight_matching`).
      solver: the exact assignment solver (see `tna_jax.align.lap`).
      threads: assignment problems solved at once.
      first_sweep: ``"auto"``/``"forward"`` (the first sweep in the spec's order, each permutation
        against the neighbours solved before it) or ``"standard"``, as in `weight_matching`.

    Returns:
      a `MatchResult` whose ``perm`` holds ``(N, ...)`` index arrays (row ``i`` aligns model
      ``i``), ``iterations`` the sweeps until no model changed, ``objective`` one ``(N,)``
      array per sweep and ``solves`` the assignment problems solved.

    Raises:
      ValueError: models that do not fit the spec (the path is named), ``max_iter < 1``, an
        unknown `first_sweep`.

    Examples:
      >>> import jax
      >>> from tna_jax import models as zoo, tree
      >>> from tna_jax.align import permutation_spec, random_permutation, apply_permutation, invert_permutation
      >>> net = zoo.build({"name": "mlp", "depth": 2, "width": 8}, (12,), 3)
      >>> spec = permutation_spec(net)
      >>> a = net.init(jax.random.key(0))
      >>> hidden = [random_permutation(spec, jax.random.key(i)) for i in range(3)]
      >>> res = align_to_reference(spec, a, tree.stack([apply_permutation(spec, p, a) for p in hidden]), jax.random.key(1))
      >>> all((res.perm[k][i] == invert_permutation(spec, p)[k]).all() for i, p in enumerate(hidden) for k in spec.names)
      True
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}.")
    if first_sweep not in FIRST_SWEEPS:
        raise ValueError(f"first_sweep must be one of {FIRST_SWEEPS}; got {first_sweep!r}.")
    collections = (collections,) if isinstance(collections, str) else tuple(collections)
    first = tree_lib.index(stacked, 0)
    la = select_leaves(spec, a, collections, "a")
    select_leaves(spec, first, collections, "stacked")
    lb = {name: x for name, x in tree_lib.named_leaves(stacked) if name in la}
    n = int(np.shape(next(iter(lb.values())))[0])
    solve = get_solver(solver)
    plans = costs_lib.plan_groups(spec, tuple(sorted(la)))
    names = list(plans)
    ident = identity_permutation(spec)
    perm = {k: np.stack([ident[k]] * n).astype(np.int32) for k in spec.names}
    ident_n = {k: v.copy() for k, v in perm.items()}
    version = np.zeros((n, len(names)), np.int64)
    seen: dict[tuple[int, str], np.ndarray] = {}
    gi = {g: i for i, g in enumerate(names)}
    objective, converged, it, solves = [], False, 0, 0

    def task(job):
        i, g, c0, cc = job
        plan = plans[g]
        if plan.children:
            kids = {k: perm[k][i] for k in plan.children}
            old = nested_value(c0, cc, perm[g][i], kids)
            new, new_kids, value = solve_nested(c0, cc, solve)
            return i, g, old, {g: new, **new_kids}, value
        old = float(c0[np.arange(plan.size), perm[g][i]].sum())
        new, value = solve_assignment(c0, solve)
        return i, g, old, {g: new}, value

    orders = order_generator(key)
    with ThreadPoolExecutor(max(1, int(threads))) as pool:
        for it in range(1, int(max_iter) + 1):  # noqa: B007 (the count is returned)
            before = version.copy()
            forward = first_sweep != "standard" and it == 1
            # weight_matching's order, sweep for sweep
            sweep = names if forward else [names[int(k)] for k in orders.permutation(len(names))]
            visited: set[str] = set()
            for g in sweep:
                deps = [gi[h] for h in plans[g].deps]
                dirty = [i for i in range(n) if (i, g) not in seen or not np.array_equal(seen[(i, g)], version[i, deps])]
                if not dirty:
                    continue
                plan = plans[g]
                partial = forward and leaves_out_neighbours(plan, visited)
                visited.add(g)
                fn = _batched_partial_fn(spec, plan, frozenset(visited)) if partial else _batched_fn(spec, plan)
                out = fn(la, lb, {k: jnp.asarray(v) for k, v in perm.items()})
                c0s, ccs = (out, {}) if partial else out
                c0s = np.asarray(c0s, np.float64)
                ccs = {k: np.asarray(v, np.float64) for k, v in ccs.items()}
                jobs = [(i, g, c0s[i], {k: v[i] for k, v in ccs.items()}) for i in dirty]
                for i, g_, old, updates, value in pool.map(task, jobs):
                    solves += 1
                    if not partial:  # solved without some neighbour's term: to be solved again
                        seen[(i, g_)] = version[i, deps].copy()
                    if value > old + tol * max(1.0, abs(old)):
                        version[i, gi[g_]] += 1
                        for k, v in updates.items():
                            perm[k][i] = v
            objective.append(_objectives(spec, perm, a, stacked, collections, n))
            if forward:  # never worse than the identity: a model the forward sweep made worse starts over
                worse = np.flatnonzero(objective[-1] < _objectives(spec, ident_n, a, stacked, collections, n))
                for i in worse:
                    for k in spec.names:
                        if not np.array_equal(perm[k][i], ident[k]):
                            perm[k][i] = ident[k]
                            version[i, gi[k if k in gi else spec.parent[k]]] += 1
                objective[-1] = _objectives(spec, perm, a, stacked, collections, n) if len(worse) else objective[-1]
            if np.array_equal(version, before) and not forward:
                converged = True
                break
    return MatchResult(perm=perm, iterations=it, converged=converged, objective=objective, solves=solves)


def _objectives(spec: PermutationSpec, perm: Permutation, a: PyTree, stacked: PyTree, collections: tuple[str, ...],
                n: int) -> np.ndarray:
    from tna_jax.align.weight_matching import matching_objective

    return np.asarray([matching_objective(spec, {k: v[i] for k, v in perm.items()}, a, tree_lib.index(stacked, i),
                                          collections=collections) for i in range(n)], np.float64)
