"""Weight matching (Ainsworth et al. 2023, "Git Re-Basin", Algorithm 1).

Find the permutation ``P`` of model B's hidden units that makes its weights closest to model A's:

    max_P  Σ_w ⟨W_w^A, P(W_w^B)⟩        (equivalently min_P ‖θ_A − P(θ_B)‖²)

where the sum runs over every array the spec names. The problem couples the permutations of
consecutive layers, so it is solved by coordinate descent: visit the permutations in a random
order (from `key`) and solve each one exactly given the others, a linear assignment problem

    P_ℓ = argmax_P ⟨C_ℓ, P⟩,   C_ℓ[i, j] = Σ_{(w, ax) ∋ ℓ} ⟨A_w[.., i, ..], P_{¬ℓ}(B_w)[.., j, ..]⟩,

until a whole sweep changes nothing. The cost matrices ``C_ℓ`` are built by one jitted JAX
function per permutation (a tensordot over every array that touches it, with all the other
permutations applied); only the assignment itself runs on the host (SciPy's exact
``linear_sum_assignment``, a shortest augmenting path/LAPJV solver).

Nested permutations (attention's head dimension, reordered per head) are solved jointly with
their parent, exactly: for every pair of heads (h, h') the best assignment of their dimensions is
a small assignment problem; the heads are then assigned with those optimal values as costs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from tna_jax import tree as tree_lib
from tna_jax.align.spec import (
    Permutation,
    PermutationSpec,
    check_permutation,
    identity_permutation,
    permute_leaf,
)

PyTree = Any

__all__ = ["weight_matching", "MatchResult", "matching_objective", "solve_assignment", "solve_nested"]


class MatchResult(NamedTuple):
    """What :func:`weight_matching` returns.

    Attributes:
      perm: ``{name: index array}`` with ``apply_permutation(spec, perm, b) ≈ a``.
      iterations: sweeps over all permutations until one changed nothing (that last sweep
        included), or ``max_iter``.
      converged: whether the last sweep changed nothing.
      objective: ``Σ_w ⟨A_w, P(B_w)⟩`` after each sweep (starting with the identity). The first
        and last entries are computed from the weights; the ones between are the first plus
        every accepted update's gain, read off the cost matrices the sweep solved anyway (a
        permutation changes only the terms its cost matrix holds), so a sweep never permutes
        the whole of B just to report progress.
    """

    perm: Permutation
    iterations: int
    converged: bool
    objective: list[float]


def solve_assignment(cost: np.ndarray) -> tuple[np.ndarray, float]:
    """``(cols, value)`` maximising ``Σ_i cost[i, cols[i]]`` exactly (SciPy's LAP solver)."""
    rows, cols = linear_sum_assignment(cost, maximize=True)
    return cols.astype(np.int32), float(cost[rows, cols].sum())


def solve_nested(c0: np.ndarray, children: Mapping[str, np.ndarray]
                 ) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """The exact joint assignment of a parent permutation and its nested children.

    Args:
      c0: ``(g, g)`` costs of the parent's units alone.
      children: ``{child: (g, d, g, d)}`` costs ``C[y, x, y', x']`` of unit ``x`` of parent unit
        ``y`` of A against unit ``x'`` of parent unit ``y'`` of B.

    Returns:
      ``(parent perm (g,), {child: (g, d)}, value)``.
    """
    g = c0.shape[0]
    total = c0.astype(np.float64).copy()
    best: dict[str, np.ndarray] = {}
    for name, c in children.items():
        d = c.shape[1]
        best[name] = np.zeros((g, g, d), np.int32)
        for y in range(g):
            for y2 in range(g):
                cols, value = solve_assignment(c[y, :, y2, :])
                best[name][y, y2] = cols
                total[y, y2] += value
    parent, value = solve_assignment(total)
    return parent, {n: b[np.arange(g), parent] for n, b in best.items()}, value


def _nested_value(c0: np.ndarray, children: Mapping[str, np.ndarray], parent: np.ndarray,
                  kids: Mapping[str, np.ndarray]) -> float:
    g = c0.shape[0]
    value = float(c0[np.arange(g), parent].sum())
    for name, c in children.items():
        sigma = np.asarray(kids[name])
        d = c.shape[1]
        yy = np.repeat(np.arange(g), d)
        xx = np.tile(np.arange(d), g)
        value += float(c[yy, xx, np.asarray(parent)[yy], sigma.reshape(-1)].sum())
    return value


def _matrix(x: jax.Array, axis: int) -> jax.Array:
    return jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


@functools.lru_cache(maxsize=512)
def _cost_fn(spec: PermutationSpec, group: str, paths: tuple[str, ...]):
    """Jitted ``(a_leaves, b_leaves, perm) -> (c0, {child: c})`` for one top-level permutation."""
    children = spec.children(group)
    members = {group, *children}
    leaves = spec.leaves
    parent = spec.parent
    n = spec.size[group]

    def fn(a: dict[str, jax.Array], b: dict[str, jax.Array], perm: dict[str, jax.Array]):
        c0 = jnp.zeros((n, n), jnp.float32)
        cc = {c: jnp.zeros((n, spec.size[c], n, spec.size[c]), jnp.float32) for c in children}
        for path in paths:
            lay = leaves[path]
            if not members & set(lay.perms):
                continue
            x = jnp.reshape(a[path], lay.factors).astype(jnp.float32)
            if not children:
                for ax in lay.axes_of(group):
                    y = permute_leaf(lay, parent, perm, b[path], skip={ax})
                    y = jnp.reshape(y, lay.factors).astype(jnp.float32)
                    c0 = c0 + _matrix(x, ax) @ _matrix(y, ax).T
                continue
            (ay,) = lay.axes_of(group)
            kids = [(c, lay.axes_of(c)[0]) for c in children if c in lay.perms]
            skip = {ay, *(ax for _, ax in kids)}
            y = permute_leaf(lay, parent, perm, b[path], skip=skip)
            y = jnp.reshape(y, lay.factors).astype(jnp.float32)
            if not kids:
                c0 = c0 + _matrix(x, ay) @ _matrix(y, ay).T
                continue
            (child, ax), = kids
            d = spec.size[child]
            xm = jnp.moveaxis(x, (ay, ax), (0, 1)).reshape(n, d, -1)
            ym = jnp.moveaxis(y, (ay, ax), (0, 1)).reshape(n, d, -1)
            cc[child] = cc[child] + jnp.einsum("ixr,jyr->ixjy", xm, ym)
        return c0, cc

    return jax.jit(fn)


def _select(spec: PermutationSpec, variables: PyTree, collections: tuple[str, ...], argument: str
            ) -> dict[str, jax.Array]:
    spec.check_variables(variables, argument=argument)
    leaves = spec.leaves
    return {name: x for name, x in tree_lib.named_leaves(variables)
            if name in leaves and name.split("/")[0] in collections}


def matching_objective(spec: PermutationSpec, perm: Permutation, a: PyTree, b: PyTree, *,
                       collections: tuple[str, ...] = ("params",)) -> float:
    """``Σ_w ⟨A_w, P(B_w)⟩`` over the arrays of the spec in `collections` (what weight matching
    maximises)."""
    la, lb = _select(spec, a, collections, "a"), _select(spec, b, collections, "b")
    check_permutation(spec, perm)
    return float(_objective_fn(spec, tuple(sorted(la)))(la, lb, {k: jnp.asarray(v) for k, v in perm.items()}))


@functools.lru_cache(maxsize=128)
def _objective_fn(spec: PermutationSpec, paths: tuple[str, ...]):
    leaves, parent = spec.leaves, spec.parent

    def fn(a, b, perm):
        total = jnp.zeros((), jnp.float32)
        for p in paths:
            y = permute_leaf(leaves[p], parent, perm, b[p])
            total = total + jnp.vdot(a[p].astype(jnp.float32), y.astype(jnp.float32))
        return total

    return jax.jit(fn)


def weight_matching(spec: PermutationSpec, a: PyTree, b: PyTree, key: jax.Array, max_iter: int = 100, *,
                    collections: tuple[str, ...] = ("params",), init: Permutation | None = None,
                    tol: float = 1e-9) -> MatchResult:
    """Permutes model B's hidden units to match model A's weights (Git Re-Basin, weight matching).

    Args:
      spec: the permutation spec of the architecture (:func:`tna_jax.align.permutation_spec`).
      a, b: the two models' variables (``{"params": ..., ["batch_stats": ...]}``).
      key: PRNG key for the order in which permutations are visited in each sweep.
      max_iter: at most this many sweeps.
      collections: which collections enter the objective (default the parameters; BatchNorm
        statistics are permuted by ``apply_permutation`` but not matched).
      init: starting permutation (default the identity).
      tol: a permutation is replaced only when its objective improves by more than
        ``tol * max(1, |objective|)``, so ties cannot cycle.

    Returns:
      a :class:`MatchResult` ``(perm, iterations, converged, objective)``; apply ``perm`` to `b`.

    Raises:
      ValueError: `a` or `b` lacks an array of the spec or has another shape there (the path is
        named); ``max_iter < 1``.

    Examples:
      >>> import jax
      >>> from tna_jax import models
      >>> from tna_jax.align import permutation_spec, random_permutation, apply_permutation
      >>> net = models.build({"name": "mlp", "depth": 2, "width": 16}, (40,), 10)
      >>> spec = permutation_spec(net)
      >>> a = net.init(jax.random.key(0))
      >>> b = apply_permutation(spec, random_permutation(spec, jax.random.key(1)), a)
      >>> res = weight_matching(spec, a, b, jax.random.key(2))
      >>> aligned = apply_permutation(spec, res.perm, b)
      >>> bool(jax.numpy.all(aligned["params"]["dense_1"]["kernel"] == a["params"]["dense_1"]["kernel"]))
      True
    """
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer; got {max_iter!r}.")
    if isinstance(collections, str):
        collections = (collections,)
    la = _select(spec, a, tuple(collections), "a")
    lb = _select(spec, b, tuple(collections), "b")
    if not la:
        raise ValueError(f"none of the spec's arrays is in collections {collections}; the spec has "
                         f"{sorted({p.split('/')[0] for p in spec.leaves})}.")
    paths = tuple(sorted(la))
    perm = {k: np.asarray(v).astype(np.int32) for k, v in (init or identity_permutation(spec)).items()}
    check_permutation(spec, perm, argument="init")
    groups = [(g, kids) for g, kids in spec.groups()
              if any(({g, *kids} & set(spec.leaves[p].perms)) for p in paths)]
    fns = {g: _cost_fn(spec, g, paths) for g, _ in groups}
    device_perm = {k: jnp.asarray(v) for k, v in perm.items()}
    objective = [matching_objective(spec, perm, a, b, collections=tuple(collections))]
    running = objective[0]
    converged = False
    it = 0
    for it in range(1, int(max_iter) + 1):
        progress = False
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, it), len(groups)))
        for gi in order:
            g, kids = groups[int(gi)]
            c0, cc = fns[g](la, lb, device_perm)
            c0 = np.asarray(c0, np.float64)
            if not kids:
                old = float(c0[np.arange(c0.shape[0]), perm[g]].sum())
                new, value = solve_assignment(c0)
                updates = {g: new}
            else:
                cc = {k: np.asarray(v, np.float64) for k, v in cc.items()}
                old = _nested_value(c0, cc, perm[g], {k: perm[k] for k in kids})
                new, new_kids, value = solve_nested(c0, cc)
                updates = {g: new, **new_kids}
            if value > old + tol * max(1.0, abs(old)):
                progress = True
                running += float(value) - old
                for k, v in updates.items():
                    perm[k] = v.astype(np.int32)
                    device_perm[k] = jnp.asarray(perm[k])
        objective.append(running)
        if not progress:
            converged = True
            break
    objective[-1] = matching_objective(spec, perm, a, b, collections=tuple(collections))
    return MatchResult(perm=perm, iterations=it, converged=converged, objective=objective)
