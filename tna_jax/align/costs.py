"""The cost matrices of weight matching: which arrays feed each one, full builds and cheap updates.

For a top-level permutation $g$ the cost matrix is a sum of one term per (array $w$, axis of $w$
carrying $g$):

$$C_g[i, j] = \\sum_{(w, a)} \\big\\langle A_w[\\ldots, i@a, \\ldots],\\;
P_{\\neg g}(B_w)[\\ldots, j@a, \\ldots] \\big\\rangle .$$

Each term is one of three kinds:

* **constant**: no other permutation acts on $w$ (a bias, the input side of the first layer, a
  normalisation scale): computed once per matching;
* **single**: exactly one other top-level permutation $h$ acts on $w$, on one axis (a dense or
  convolution kernel between two hidden layers). When $h$ changes in the $m$ positions $K$, the
  term changes by a rank-$m$ correction
  $\\Delta T = \\sum_{k \\in K} A_w[k@b]^\\top \\big(B_w[h_{new}(k)@b] - B_w[h_{old}(k)@b]\\big)$,
  $2 n_g^2 m s$ FLOPs instead of $2 n_g^2 n_h s$ ($s$: the other axes, e.g. the 3x3 of a
  convolution);
* **full**: anything else (nested head permutations, an array carrying $g$ twice, two other
  permutations): recomputed whenever the permutation is solved.

Full builds are jitted JAX functions (on the device, several permutations in one call); the
rank-$m$ updates run on the host in NumPy (their sizes change from one update to the next, which
would recompile a jitted function every time). When the weights are in host memory (JAX on
CPU) every matrix is built on the host (`host_costs`, `contract_all_but`): NumPy's BLAS is faster
there than XLA:CPU's dot, and small problems skip a jitted call's dispatch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax.align.spec import PermutationSpec, hash_once, permute_leaf

__all__ = ["group_costs"]  # the rest is internal to weight matching; documented here for readers


@dataclasses.dataclass(frozen=True)
class Term:
    """One array's contribution to a cost matrix.

    Attributes:
      path: the array.
      axis: its expanded axis carrying the permutation.
      other: the one other permutation acting on it (``"single"`` terms), else None.
      other_axis: the expanded axis of `other`.
    """

    path: str
    axis: int
    other: str | None = None
    other_axis: int | None = None


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """How the cost matrix of one top-level permutation is built.

    Attributes:
      name: the permutation.
      children: its nested permutations (solved jointly with it).
      size: its number of units.
      constant: the constant terms.
      single: ``{other permutation: its terms}``.
      full: True when some term is neither constant nor single, or there are children: then the
        whole matrix is rebuilt at every solve.
      deps: the top-level permutations the matrix depends on (itself included when an array
        carries it twice).
    """

    name: str
    children: tuple[str, ...]
    size: int
    constant: tuple[Term, ...]
    single: tuple[tuple[str, tuple[Term, ...]], ...]
    full: bool
    deps: frozenset[str]

    @property
    def singles(self) -> dict[str, tuple[Term, ...]]:
        return dict(self.single)

    def __hash__(self) -> int:  # computed once: plans key the caches of every solve
        return hash_once(self, lambda: (self.name, self.children, self.size, self.constant, self.single, self.full,
                                        self.deps))


def plan_groups(spec: PermutationSpec, paths: Sequence[str]) -> dict[str, GroupPlan]:
    """A `GroupPlan` for every top-level permutation that touches one of `paths`."""
    return dict(_plan_groups(spec, tuple(paths)))


@functools.lru_cache(maxsize=64)
def _plan_groups(spec: PermutationSpec, paths: tuple[str, ...]) -> tuple[tuple[str, GroupPlan], ...]:
    leaves, parent = spec.leaves, spec.parent

    def top(p: str) -> str:
        return parent[p] or p

    plans = {}
    for g, kids in spec.groups():
        members = {g, *kids}
        constant: list[Term] = []
        single: dict[str, list[Term]] = {}
        full = bool(kids)
        deps: set[str] = set()
        touched = False
        for path in paths:
            lay = leaves[path]
            if not members & set(lay.perms):
                continue
            touched = True
            tops = [top(p) if p else None for p in lay.perms]
            deps.update(t for t in tops if t and t != g)
            if sum(t == g for t in tops) > 1 + sum(p in kids for p in lay.perms):
                deps.add(g)  # the array carries g on two axes: its cost depends on g itself
            for ax in lay.axes_of(g):
                others = [(i, p) for i, p in enumerate(lay.perms) if p is not None and i != ax]
                if not others:
                    constant.append(Term(path, ax))
                elif len(others) == 1 and parent[others[0][1]] is None and others[0][1] != g:
                    (oax, h), = others
                    single.setdefault(h, []).append(Term(path, ax, h, oax))
                else:
                    full = True
        if touched:
            plans[g] = GroupPlan(g, tuple(kids), spec.size[g], tuple(constant),
                                 tuple((h, tuple(t)) for h, t in single.items()), full, frozenset(deps))
    return tuple(plans.items())


def colour_classes(plans: Mapping[str, GroupPlan]) -> list[tuple[str, ...]]:
    """Greedy colouring of the dependency graph, in the spec's order: permutations of one class
    share no array, so solving them together equals solving them one after another."""
    colour: dict[str, int] = {}
    for g, plan in plans.items():
        used = {colour[h] for h in plan.deps if h in colour}
        used |= {colour[h] for h, p in plans.items() if g in p.deps and h in colour}
        colour[g] = next(c for c in range(len(plans) + 1) if c not in used)
    return [tuple(g for g in plans if colour[g] == c) for c in range(max(colour.values(), default=-1) + 1)]


def _part_terms(spec: PermutationSpec, plan: GroupPlan, part: str, paths: Sequence[str]) -> list[Term]:
    """The terms of one part of `plan`: ``"const"``, ``"var"`` (every neighbour's), ``"terms"``
    (both: a plan restricted to some neighbours builds just those) or ``"all"`` (every axis
    carrying the permutation in the arrays `paths`; plain permutations)."""
    if part == "const":
        return list(plan.constant)
    if part == "var":
        return [t for _, ts in plan.single for t in ts]
    if part == "terms":
        return [*plan.constant, *(t for _, ts in plan.single for t in ts)]
    return [Term(path, ax) for path in paths for ax in spec.leaves[path].axes_of(plan.name)]


def _matrix(x: jax.Array, axis: int) -> jax.Array:
    return jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def group_costs(spec: PermutationSpec, plan: GroupPlan, part: str, a: Mapping[str, jax.Array],
                 b: Mapping[str, jax.Array], perm: Mapping[str, jax.Array]) -> Any:
    """The cost matrix of one group of permutations solved together.

    Args:
      spec: the permutation spec.
      plan: the group's plan (its size, constant, single and pair terms).
      part: ``"const"`` (terms that never change), ``"var"`` (terms that depend on the other
        permutations), ``"terms"`` (the plan's const and var terms: of a plan restricted to
        some neighbours, just theirs) or ``"all"``.
      a, b: the two models' parameters by path.
      perm: the current permutations by name.

    Returns:
      ``c0``, the ``(n, n)`` float32 matrix of the plan's terms, for ``"const"``, ``"var"`` and ``"terms"``;
      ``(c0, {child: (n, d, n, d)})`` with the per-child terms of rank-m updates for ``"all"``.
    """
    leaves, parent = spec.leaves, spec.parent
    n = plan.size
    c0 = jnp.zeros((n, n), jnp.float32)
    if part in ("const", "var", "terms"):
        for t in _part_terms(spec, plan, part, ()):
            lay = leaves[t.path]
            x = jnp.reshape(a[t.path], lay.factors).astype(jnp.float32)
            y = permute_leaf(lay, parent, perm, b[t.path], skip={t.axis})
            y = jnp.reshape(y, lay.factors).astype(jnp.float32)
            c0 = c0 + _matrix(x, t.axis) @ _matrix(y, t.axis).T
        return c0
    g, children = plan.name, plan.children
    members = {g, *children}
    cc = {c: jnp.zeros((n, spec.size[c], n, spec.size[c]), jnp.float32) for c in children}
    for path in sorted(a):
        lay = leaves[path]
        if not members & set(lay.perms):
            continue
        x = jnp.reshape(a[path], lay.factors).astype(jnp.float32)
        if not children:
            for ax in lay.axes_of(g):
                y = permute_leaf(lay, parent, perm, b[path], skip={ax})
                y = jnp.reshape(y, lay.factors).astype(jnp.float32)
                c0 = c0 + _matrix(x, ax) @ _matrix(y, ax).T
            continue
        (ay,) = lay.axes_of(g)
        kids = [(c, lay.axes_of(c)[0]) for c in children if c in lay.perms]
        y = permute_leaf(lay, parent, perm, b[path], skip={ay, *(ax for _, ax in kids)})
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


@functools.lru_cache(maxsize=512)
def build_fn(spec: PermutationSpec, plans: tuple[GroupPlan, ...], parts: tuple[str, ...]):
    """Jitted ``(a, b, perm) -> tuple`` of the requested ``(plan, part)`` matrices, in one call."""

    def fn(a, b, perm):
        return tuple(group_costs(spec, plan, part, a, b, perm) for plan, part in zip(plans, parts))

    return jax.jit(fn)


_MAX_GEMM_LOOP = 64  # contract a middle axis as this many GEMMs at most when their slices are tiny,
_MIN_GEMM_LOOP_SLICE = 1 << 12  # (elements per GEMM below which a call costs more than a transposed copy)


def contract_all_but(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    """``C[i, j] = Σ x[.., i@axis, ..] y[.., j@axis, ..]`` over every other axis, in BLAS GEMMs.

    The arrays stay in their own layout: with ``axis`` first or last one GEMM reads them as
    matrices (BLAS transposes for free); with ``axis`` in the middle (a convolution's input
    channels between its taps and its output channels) it is a sum of one GEMM per leading index,
    each accumulated into the result by BLAS itself (``beta=1``: no temporary per GEMM). Moving the
    axis first instead copies both arrays, which at ResNet-20 x16 cost a third of the product, and
    for a rank-m correction's thin slices the accumulating GEMMs beat both by more.

    Float32 and float64 arrays go to SciPy's BLAS, every GEMM of a matching to the same library:
    NumPy and SciPy wheels each bundle an OpenBLAS with its own thread pool, and alternating
    between them left one pool spinning while the other worked, and the two fought for the cores.

    Args:
      x, y: NumPy arrays of one shape.
      axis: the axis kept.

    Returns:
      the ``(n, n)`` matrix (C-ordered) in the arrays' dtype.
    """
    n = x.shape[axis]
    pre, post = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
    if x.dtype != y.dtype or x.dtype not in (np.float32, np.float64):
        x = np.moveaxis(np.asarray(x), axis, 0).reshape(n, -1)
        return x @ np.moveaxis(np.asarray(y), axis, 0).reshape(n, -1).T
    gemm = _blas_gemm(x.dtype.char)
    # BLAS is column-major: a C-ordered (r, c) array is its (c, r) transpose to BLAS, and the
    # result is built as its transpose in a column-major buffer, so that ``out_t.T`` is C-ordered.
    out_t = np.zeros((n, n), x.dtype, order="F")
    if post == 1:  # C = X.T @ Y with X, Y (pre, n): C.T = Y.T @ X
        x2, y2 = np.ascontiguousarray(x).reshape(pre, n), np.ascontiguousarray(y).reshape(pre, n)
        return gemm(1.0, y2.T, x2.T, trans_b=1, c=out_t, overwrite_c=1).T
    if pre > _MAX_GEMM_LOOP and n * post < _MIN_GEMM_LOOP_SLICE:  # many tiny GEMMs: copy once instead
        x2, y2 = (np.ascontiguousarray(np.moveaxis(v, axis, 0)).reshape(n, -1) for v in (x, y))
        pre, post, x3, y3 = 1, x2.shape[1], x2[None], y2[None]
    else:
        x3, y3 = np.ascontiguousarray(x).reshape(pre, n, post), np.ascontiguousarray(y).reshape(pre, n, post)
    for k in range(pre):  # C.T += Y_k @ X_k.T: op(a) = a.T with a = Y_k.T, b = X_k.T
        out_t = gemm(1.0, y3[k].T, x3[k].T, trans_a=1, beta=1.0, c=out_t, overwrite_c=1)
    return out_t.T


@functools.lru_cache(maxsize=2)
def _blas_gemm(char: str) -> Any:
    from scipy.linalg import blas  # a dependency; imported on first use to keep `costs` light to import

    return blas.sgemm if char == "f" else blas.dgemm


@dataclasses.dataclass(frozen=True)
class HostTerms:
    """One plan's cost matrix prepared on the host once per matching (plans without nested
    children): the constant terms summed, and for every other term the two models' arrays (views,
    in the spec's expanded shapes), so that a build only gathers B along the other permutations'
    axes and contracts (`contract_all_but`).

    Attributes:
      const: the ``(n, n)`` float32 sum of the constant terms.
      terms: ``(A, B, axis, ((other axis, other permutation), ...))``.
    """

    const: np.ndarray
    terms: tuple[tuple[np.ndarray, np.ndarray, int, tuple[tuple[int, str], ...]], ...]


@functools.lru_cache(maxsize=1024)
def _host_layout(spec: PermutationSpec, plan: GroupPlan, part: str, paths: tuple[str, ...]
                 ) -> tuple[tuple[str, int, tuple[tuple[int, str], ...]], ...]:
    """``(path, axis, ((other axis, other permutation), ...))`` of every term of one part of `plan`."""
    leaves = spec.leaves
    return tuple((t.path, t.axis, tuple((i, p) for i, p in enumerate(leaves[t.path].perms) if p is not None and i != t.axis))
                 for t in _part_terms(spec, plan, part, paths))


def host_terms(spec: PermutationSpec, plan: GroupPlan, part: str, a: Mapping[str, np.ndarray],
               b: Mapping[str, np.ndarray]) -> HostTerms:
    """The `HostTerms` of one part of `plan` (``"const"``, ``"var"``, ``"terms"`` or ``"all"``, as in
    `group_costs`) from host float32 copies of the two models' arrays."""
    leaves = spec.leaves
    const = np.zeros((plan.size, plan.size), np.float32)
    terms = []
    for path, axis, others in _host_layout(spec, plan, part, tuple(sorted(a))):
        factors = leaves[path].factors
        x, y = a[path].reshape(factors), b[path].reshape(factors)
        if others:
            terms.append((x, y, axis, others))
        else:
            const += contract_all_but(x, y, axis)
    return HostTerms(const, tuple(terms))


def host_costs(terms: HostTerms, perm: Mapping[str, np.ndarray]) -> np.ndarray:
    """The matrix of `host_terms` for the permutations `perm` (float32 products; the matrix of
    `group_costs` up to the rounding of another summation order)."""
    c = terms.const.copy()
    for x, y, axis, others in terms.terms:
        for ax, p in others:
            y = np.take(y, perm[p], axis=ax)
        c += contract_all_but(x, y, axis)
    return c


@functools.lru_cache(maxsize=1024)
def sub_plan(plan: GroupPlan, other: str) -> GroupPlan:
    """`plan` restricted to the terms of its neighbour `other` (no constant terms): its ``"var"``
    part is that neighbour's term alone."""
    return dataclasses.replace(plan, constant=(), single=((other, plan.singles[other]),))


def rank_update(spec: PermutationSpec, terms: Sequence[Term], a: Mapping[str, np.ndarray],
                b: Mapping[str, np.ndarray], rows: np.ndarray, new: np.ndarray, old: np.ndarray) -> np.ndarray:
    """The change of the sum of `terms` when their other permutation moves from `old` to `new`
    at positions `rows` (host arrays, float32 products)."""
    leaves = spec.leaves
    out = None
    for t in terms:
        lay = leaves[t.path]
        x = a[t.path].reshape(lay.factors)
        y = b[t.path].reshape(lay.factors)
        xs = np.take(x, rows, axis=t.other_axis)
        d = np.take(y, new, axis=t.other_axis) - np.take(y, old, axis=t.other_axis)
        term = contract_all_but(xs, d, t.axis)
        out = term if out is None else out + term
    return out
