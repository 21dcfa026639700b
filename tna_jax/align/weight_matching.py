"""Weight matching (Ainsworth et al. 2023, "Git Re-Basin", Algorithm 1), exact and fast.

Find the permutation $P$ of model B's hidden units that makes its weights closest to model A's:

$$\\max_P \\sum_w \\langle W_w^A, P(W_w^B) \\rangle \\qquad (\\text{equivalently } \\min_P \\lVert\\theta_A - P(\\theta_B)\\rVert^2),$$

where the sum runs over every array the spec names. The problem couples the permutations of
consecutive layers, so it is solved by coordinate descent: each step solves one permutation
$P_\\ell$ exactly given the others, a linear assignment problem (LAP)
$P_\\ell = \\arg\\max_P \\langle C_\\ell, P\\rangle$ with
$C_\\ell[i, j] = \\sum_{(w, a) \\ni \\ell} \\langle A_w[.., i@a, ..], P_{\\neg\\ell}(B_w)[.., j@a, ..]\\rangle$,
until a whole sweep over the permutations changes nothing: then every permutation is an exact
LAP optimum given the others (a local optimum of the objective).

The algorithm is the paper's; what makes it fast (each step exact, so the result is a local
optimum as before):

* **Skip what cannot change.** A permutation whose neighbours (the permutations sharing an array
  with it) did not change since it was last solved would get the same cost matrix and the same
  answer: it is not solved again. A sweep in which every permutation is in that state changes
  nothing, so it ends the descent at no cost.
* **Independent permutations together.** Permutations that share no array (an MLP's first and
  third hidden layers; the inner permutations of a ResNet's blocks) do not affect each other's
  costs. In the default ``order="random"`` (the paper's: a random permutation of all of them every
  sweep, from `key`) consecutive independent permutations are solved together, their LAPs in
  threads: exactly the result of visiting them one at a time. ``order="classes"`` visits them in
  fixed classes (a colouring of the dependency graph), builds a class's cost matrices in one
  jitted call and solves its LAPs in threads; it converges in fewer sweeps but, on random-init
  MLP pairs, to local optima about 0.5% lower (BENCHMARKS.md), so it is not the default.
* **Incremental cost matrices.** A cost matrix is a constant part (biases, the input side of the
  first layer: computed once) plus terms that each depend on one neighbour. After the first
  sweeps an accepted update moves few units, so each such term is updated by a rank-$m$
  correction for the $m$ moved units (see `tna_jax.align.costs`) instead of being rebuilt; the
  matrices are kept in float64 on the host and rebuilt from the weights when many units moved or
  after ``refresh`` updates, so rounding cannot accumulate.
* **A faster exact LAP solver** when available (`tna_jax.align.lap`: lapx's Jonker-Volgenant in
  float64, SciPy otherwise).
* **Small problems on the host.** When one sweep's cost matrices take under 1e8 FLOPs
  (ResNet-20 x1, narrow MLPs) they are built in NumPy (``cost_backend="auto"``): there a jitted
  call costs more to dispatch than to compute. Same terms, same steps.
* **Compiled once.** Each permutation's matrix parts are separate jitted programs, so a run
  compiles nothing new after its first sweep, whatever the visiting order.

Nested permutations (attention's head dimension, reordered per head) are solved jointly with
their parent, exactly: for every pair of heads $(h, h')$ the best assignment of their dimensions
is a small LAP; the heads are then assigned with those optimal values as costs.
"""

from __future__ import annotations

import contextlib
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tna_jax import tree as tree_lib
from tna_jax.align import costs as costs_lib
from tna_jax.align.lap import Solver, get_solver, nested_value, solve_assignment, solve_nested
from tna_jax.align.spec import (
    Permutation,
    PermutationSpec,
    check_permutation,
    identity_permutation,
    permute_leaf,
)

PyTree = Any

__all__ = ["weight_matching", "MatchResult", "matching_objective", "select_leaves", "solve_assignment", "solve_nested",
           "ORDERS", "COST_BACKENDS"]

ORDERS = ("random", "classes")
COST_BACKENDS = ("auto", "host", "device")
_MIN_INCREMENTAL_FLOPS = 1e7  # below this a group's matrix is cheaper to rebuild than to track
_THREAD_MIN_SIZE = 128  # LAPs smaller than this are not worth a thread
# Below this many FLOPs per sweep (all cost matrices once) the cost matrices are built in NumPy: a
# jitted call per solve costs more to dispatch than to compute. Measured in one process, host vs
# device per matching: 2.4x faster at ResNet-20 x1 (6e7 FLOPs), 1.6x at an MLP of width 64, and
# still 1.1-1.5x up to 1e10 with a single BLAS thread; but with NumPy's BLAS threads on a busy
# machine small host matmuls stall on thread hand-offs, so only the smallest problems go there.
_HOST_MAX_FLOPS = 1e8
_PARTS = {"full": ("all",), "build": ("var", "const"), "rebuild": ("var",)}  # the matrices each kind builds


class MatchResult(NamedTuple):
    """What the matching functions (`weight_matching`, `activation_matching`, ...) return.

    Attributes:
      perm: ``{name: index array}`` with ``apply_permutation(spec, perm, b) ≈ a``.
      iterations: sweeps over all permutations until one changed nothing (that last sweep
        included), or ``max_iter`` (1 for one-shot methods such as activation matching).
      converged: whether the last sweep changed nothing.
      objective: the objective after each sweep (starting with the identity). For weight
        matching ``Σ_w ⟨A_w, P(B_w)⟩``: the first and last entries are computed from the
        weights; the ones between are the first plus every accepted update's gain, read off the
        solved cost matrices.
      solves: assignment problems actually solved (permutations skipped because nothing they
        depend on changed are not counted).
    """

    perm: Permutation
    iterations: int
    converged: bool
    objective: list[float]
    solves: int = 0


def select_leaves(spec: PermutationSpec, variables: PyTree, collections: tuple[str, ...], argument: str
                  ) -> dict[str, jax.Array]:
    """The named arrays of `variables` that `spec` permutes, in `collections` (checked against the spec).

    Args:
      spec: the permutation spec.
      variables: one model's variables.
      collections: the top-level collections to take (``("params",)``, or with ``"batch_stats"``).
      argument: the argument's name in error messages.

    Returns:
      ``{leaf name: array}``.

    Raises:
      ValueError: `variables` do not fit `spec` (from ``spec.check_variables``).
    """
    spec.check_variables(variables, argument=argument)
    leaves = spec.leaves
    return {name: x for name, x in tree_lib.named_leaves(variables)
            if name in leaves and name.split("/")[0] in collections}


def matching_objective(spec: PermutationSpec, perm: Permutation, a: PyTree, b: PyTree, *,
                       collections: tuple[str, ...] = ("params",)) -> float:
    """``Σ_w ⟨A_w, P(B_w)⟩`` over the arrays of the spec in `collections` (what weight matching
    maximises)."""
    la, lb = select_leaves(spec, a, collections, "a"), select_leaves(spec, b, collections, "b")
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




def _var_flops(spec: PermutationSpec, plan: costs_lib.GroupPlan) -> float:
    leaves = spec.leaves
    return float(sum(2 * plan.size * int(np.prod(leaves[t.path].shape)) for _, ts in plan.single for t in ts))


def _sweep_flops(spec: PermutationSpec, plans: dict[str, costs_lib.GroupPlan], paths: list[str]) -> float:
    """FLOPs of building every cost matrix once (``2 n |w|`` per array and axis carrying the permutation)."""
    leaves, total = spec.leaves, 0
    for path in paths:
        lay = leaves[path]
        total += 2 * math.prod(lay.shape) * sum(plans[g].size for g in lay.perms if g in plans)
    return float(total)


def _host_objective(spec: PermutationSpec, perm: Permutation, a: dict[str, np.ndarray], b: dict[str, np.ndarray]
                    ) -> float:
    """`matching_objective` in NumPy on host copies (plain permutations only)."""
    leaves = spec.leaves
    total = 0.0
    for path in sorted(a):
        lay = leaves[path]
        y = b[path].reshape(lay.factors)
        for ax, p in enumerate(lay.perms):
            if p is not None:
                y = np.take(y, perm[p], axis=ax)
        total += float(np.vdot(a[path].reshape(-1), y.reshape(-1)))
    return total


@functools.lru_cache(maxsize=1)
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """The host path's matmuls are tiny: one BLAS thread each. With several, every call waits on a
    thread hand-off, which on a busy machine made the host path 10x slower (threadpoolctl, from the
    ``fast`` extra; a no-op without it)."""
    controller = _blas_controller()
    return controller.limit(limits=1, user_api="blas") if controller is not None else contextlib.nullcontext()


class _Matcher:
    """The state of one weight-matching run (host copies, cost matrices, versions); not public."""

    def __init__(self, spec: PermutationSpec, la: dict[str, jax.Array], lb: dict[str, jax.Array],
                 perm: dict[str, np.ndarray], plans: dict[str, costs_lib.GroupPlan], solver: Solver,
                 incremental: bool | str, refresh: int, tol: float, on_host: bool = False):
        self.spec, self.la, self.lb, self.plans = spec, la, lb, plans
        self.on_host = on_host  # every cost matrix built in NumPy from `full_host` (small problems)
        self.full_host = ({p: np.asarray(x, np.float32) for p, x in la.items()},
                          {p: np.asarray(x, np.float32) for p, x in lb.items()}) if on_host else None
        self.perm = perm
        self.dev = {} if on_host else {k: jnp.asarray(v) for k, v in perm.items()}
        self.solver, self.refresh, self.tol = solver, refresh, tol
        self.incr = {g: bool(incremental) and not p.full and bool(p.single)
                     and (incremental is True or _var_flops(spec, p) >= _MIN_INCREMENTAL_FLOPS)
                     for g, p in plans.items()}
        self.version = dict.fromkeys(plans, 0)
        self.seen: dict[str, dict[str, int]] = {}
        self.cost: dict[str, np.ndarray] = {}
        self.const: dict[str, np.ndarray] = {}
        self.synced: dict[str, dict[str, np.ndarray]] = {}
        self.updates = dict.fromkeys(plans, 0)
        self.solves = 0
        self._host: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
        self.pool: ThreadPoolExecutor | None = None

    # ---- bookkeeping ---------------------------------------------------------------------------
    def clean(self, g: str) -> bool:
        seen = self.seen.get(g)
        return seen is not None and all(self.version[h] == v for h, v in seen.items())

    def host(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        if self._host is None and self.on_host:
            self._host = self.full_host
        if self._host is None:
            paths = {t.path for g, p in self.plans.items() if self.incr[g] for _, ts in p.single for t in ts}
            self._host = ({p: np.asarray(self.la[p], np.float32) for p in paths},
                          {p: np.asarray(self.lb[p], np.float32) for p in paths})
        return self._host

    def moved(self, g: str) -> dict[str, np.ndarray]:
        synced = self.synced[g]
        return {h: np.flatnonzero(self.perm[h] != synced[h]) for h in synced}

    def kind(self, g: str) -> str:
        """``"full"`` (whole matrix, every time), ``"build"`` (first build of a tracked matrix),
        ``"rebuild"`` (its non-constant part again) or ``"update"`` (rank-m corrections)."""
        if not self.incr[g]:
            return "full"
        if g not in self.cost:
            return "build"
        moved = {h: r for h, r in self.moved(g).items() if r.size}
        if any(r.size * 2 > self.spec.size[h] for h, r in moved.items()) or \
                self.updates[g] + len(moved) > self.refresh:
            return "rebuild"
        return "update"

    # ---- one batch of independent permutations -------------------------------------------------
    def dispatch(self, todo: list[tuple[str, str]], together: bool) -> dict[str, Any]:
        """Starts the jitted builds the batch needs (asynchronously); ``{group: outputs}``."""
        need = [(g, k) for g, k in todo if k != "update"]
        if not need or self.on_host:
            return {}
        if together and len(need) > 1 and len({k for _, k in need}) == 1:
            plans = tuple(self.plans[g] for g, k in need for _ in _PARTS[k])
            flat = tuple(p for _, k in need for p in _PARTS[k])
            outs = costs_lib.build_fn(self.spec, plans, flat)(self.la, self.lb, self.dev)
            width = len(_PARTS[need[0][1]])
            return {g: outs[i * width:(i + 1) * width] for i, (g, _) in enumerate(need)}
        # one program per (permutation, part): a rebuild reuses the "var" program of the first build,
        # so a run compiles nothing new once every permutation has been built once
        return {g: tuple(costs_lib.build_fn(self.spec, (self.plans[g],), (p,))(self.la, self.lb, self.dev)[0]
                         for p in _PARTS[k]) for g, k in need}

    def solve_one(self, g: str, kind: str, out: Any) -> tuple[str, float, dict[str, np.ndarray], float]:
        """Brings the cost matrix of `g` up to date and solves it: ``(g, old value, new perms, value)``."""
        plan = self.plans[g]
        n = plan.size
        if self.on_host and kind != "update":
            out = tuple(costs_lib.host_costs(self.spec, plan, p, *self.full_host, self.perm) for p in _PARTS[kind])
        if kind == "full":
            c0, cc = out[0]
            c0 = np.asarray(c0, np.float64)
            if plan.children:
                cc = {k: np.asarray(v, np.float64) for k, v in cc.items()}
                old = nested_value(c0, cc, self.perm[g], {k: self.perm[k] for k in plan.children})
                new, kids, value = solve_nested(c0, cc, self.solver)
                return g, old, {g: new, **kids}, value
            cost = c0
        else:
            if kind in ("build", "rebuild"):
                if kind == "build":
                    self.const[g] = np.asarray(out[1], np.float32)
                self.cost[g] = np.asarray(out[0], np.float64) + self.const[g]
                self.synced[g] = {h: self.perm[h].copy() for h, _ in plan.single}
                self.updates[g] = 0
            else:
                ha, hb = self.host()
                singles = plan.singles
                for h, rows in self.moved(g).items():
                    if rows.size:
                        self.cost[g] += costs_lib.rank_update(self.spec, singles[h], ha, hb, rows, self.perm[h][rows],
                                                              self.synced[g][h][rows])
                        self.synced[g][h] = self.perm[h].copy()
                        self.updates[g] += 1
            cost = self.cost[g]
        old = float(cost[np.arange(n), self.perm[g]].sum())
        new, value = solve_assignment(cost, self.solver)
        return g, old, {g: new}, value

    def run_batch(self, batch: list[str], together: bool) -> float:
        """Solves the permutations of `batch` that are not clean; returns the objective's gain."""
        todo = [(g, self.kind(g)) for g in batch if not self.clean(g)]
        if not todo:
            return 0.0
        outs = self.dispatch(todo, together)
        jobs = [(g, k, outs.get(g)) for g, k in todo]
        if self.pool is not None and len(jobs) > 1 and max(self.plans[g].size for g, _ in todo) >= _THREAD_MIN_SIZE:
            results = list(self.pool.map(lambda j: self.solve_one(*j), jobs))
        else:
            results = [self.solve_one(*j) for j in jobs]
        for g, _, _, _ in results:  # what each was solved against, before any of them is accepted
            self.seen[g] = {h: self.version[h] for h in self.plans[g].deps}
        gain = 0.0
        for g, old, updates, value in results:
            self.solves += 1
            if value > old + self.tol * max(1.0, abs(old)):
                gain += value - old
                self.version[g] += 1
                for k, v in updates.items():
                    self.perm[k] = np.asarray(v, np.int32)
                    if not self.on_host:
                        self.dev[k] = jnp.asarray(self.perm[k])
        return gain


def _batches(order: str, names: list[str], plans: dict[str, costs_lib.GroupPlan], classes: list[tuple[str, ...]],
             key: jax.Array, it: int) -> list[list[str]]:
    """The sweep's visiting order, cut into batches of mutually independent permutations."""
    if order == "classes":
        return [list(c) for c in classes]
    seq = [names[int(i)] for i in np.asarray(jax.random.permutation(jax.random.fold_in(key, it), len(names)))]
    out: list[list[str]] = []
    for g in seq:
        if out and not any(g in plans[h].deps or h in plans[g].deps for h in out[-1]):
            out[-1].append(g)
        else:
            out.append([g])
    return out


def _check_options(max_iter: Any, order: Any, refresh: Any, threads: Any, incremental: Any, cost_backend: Any
                   ) -> None:
    for name, value, lo in (("max_iter", max_iter, 1), ("refresh", refresh, 1), ("threads", threads, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}.")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}.")
    if incremental not in (True, False, "auto"):
        raise ValueError(f"incremental must be True, False or 'auto'; got {incremental!r}.")
    if cost_backend not in COST_BACKENDS:
        raise ValueError(f"cost_backend must be one of {COST_BACKENDS}; got {cost_backend!r}.")


def weight_matching(spec: PermutationSpec, a: PyTree, b: PyTree, key: jax.Array, max_iter: int = 100, *,
                    collections: tuple[str, ...] = ("params",), init: Permutation | None = None,
                    tol: float = 1e-9, order: str = "random", solver: str | Solver = "auto",
                    incremental: bool | str = "auto", refresh: int = 16, threads: int = 2,
                    cost_backend: str = "auto") -> MatchResult:
    """Permutes model B's hidden units to match model A's weights (Git Re-Basin, weight matching).

    Args:
      spec: the permutation spec of the architecture (`tna_jax.align.permutation_spec`).
      a, b: the two models' variables (``{"params": ..., ["batch_stats": ...]}``).
      key: PRNG key for the visiting order (``order="random"``; unused by ``"classes"``).
      max_iter: at most this many sweeps.
      collections: which collections enter the objective (default the parameters; BatchNorm
        statistics are permuted by ``apply_permutation`` but not matched).
      init: starting permutation (default the identity).
      tol: a permutation is replaced only when its objective improves by more than
        ``tol * max(1, |objective|)``, so ties cannot cycle.
      order: ``"random"`` (the paper's random order every sweep; independent neighbours in it
        are solved together, with the result of visiting them one at a time) or ``"classes"``
        (independent permutations together in fixed classes: fewer sweeps, slightly lower
        optima on average).
      solver: the exact LAP solver, ``"auto"``, ``"scipy"``, ``"lapx"`` or a callable (see
        `tna_jax.align.lap`).
      incremental: update cost matrices by rank-m corrections: ``"auto"`` where a matrix costs
        enough to build that tracking it pays (about 10 MFLOP), True wherever possible, False
        never (rebuild each one from the weights at every solve, as the paper does).
      refresh: rebuild a tracked cost matrix from the weights after this many corrections.
      threads: solve up to this many independent assignment problems at once.
      cost_backend: where cost matrices are built: ``"device"`` (jitted JAX), ``"host"`` (NumPy;
        plain permutations only) or ``"auto"``: the host when one sweep's cost matrices take under
        1e8 FLOPs (ResNet-20 x1, MLPs up to width ~128) and no permutation is nested, since there
        a jitted call costs more to dispatch than to compute. Same matrices up to float32
        rounding, same algorithm.

    Returns:
      a `MatchResult` ``(perm, iterations, converged, objective, solves)``; apply ``perm`` to `b`.

    Raises:
      ValueError: `a` or `b` lacks an array of the spec or has another shape there (the path is
        named); an option out of range (named).

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
    _check_options(max_iter, order, refresh, threads, incremental, cost_backend)
    solve = get_solver(solver)
    if isinstance(collections, str):
        collections = (collections,)
    collections = tuple(collections)
    la, lb = select_leaves(spec, a, collections, "a"), select_leaves(spec, b, collections, "b")
    if not la:
        raise ValueError(f"none of the spec's arrays is in collections {collections}; the spec has "
                         f"{sorted({p.split('/')[0] for p in spec.leaves})}.")
    perm = {k: np.asarray(v).astype(np.int32) for k, v in (init or identity_permutation(spec)).items()}
    check_permutation(spec, perm, argument="init")
    plans = costs_lib.plan_groups(spec, tuple(sorted(la)))
    nested = any(p.children for p in plans.values())
    if cost_backend == "host" and nested:
        raise ValueError("cost_backend='host' supports plain permutations only; this spec has nested ones "
                         f"({sorted(k for p in plans.values() for k in p.children)}): use 'auto' or 'device'.")
    on_host = cost_backend == "host" or (cost_backend == "auto" and not nested
                                         and _sweep_flops(spec, plans, list(la)) < _HOST_MAX_FLOPS)
    m = _Matcher(spec, la, lb, perm, plans, solve, incremental, int(refresh), float(tol), on_host=on_host)
    names = list(plans)
    classes = costs_lib.colour_classes(plans)

    def objective_now() -> float:
        if on_host:
            return _host_objective(spec, perm, *m.full_host)
        return matching_objective(spec, perm, a, b, collections=collections)

    objective = [objective_now()]
    running, converged, it = objective[0], False, 0
    m.pool = ThreadPoolExecutor(int(threads)) if threads > 1 else None
    try:
        with _one_blas_thread() if on_host else contextlib.nullcontext():
            for it in range(1, int(max_iter) + 1):
                before = dict(m.version)
                for batch in _batches(order, names, plans, classes, key, it):
                    running += m.run_batch(batch, together=order == "classes")
                objective.append(running)
                if m.version == before:  # nothing accepted: every permutation is optimal given the others
                    converged = True
                    break
    finally:
        if m.pool is not None:
            m.pool.shutdown()
    objective[-1] = objective_now()
    return MatchResult(perm=perm, iterations=it, converged=converged, objective=objective, solves=m.solves)
