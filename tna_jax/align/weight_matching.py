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

The algorithm is the paper's, with one change to where it starts, and what makes it fast (each
step exact, so the result is a local optimum as before):

* **A forward first sweep** (``first_sweep="auto"`` from the identity, or ``"forward"``). The
  paper's first sweep solves each permutation against neighbours that are still at the identity,
  and for two independently trained (or initialised) models a term against an unaligned
  neighbour is noise. The first sweep here visits the permutations in the spec's order (input to
  output) and solves each against its constant terms and the neighbours solved before it only:
  the layer-by-layer matching of a feed-forward pass, which the later sweeps (random order, every
  term) then refine to a local optimum. No term is built against a neighbour that is about to
  move, the descent needs fewer sweeps, and it ends at higher optima (random-init MLPs and
  ResNet-20s: BENCHMARKS.md). ``"standard"`` is the paper's first sweep.
* **Skip what cannot change.** A permutation whose neighbours (the permutations sharing an array
  with it) did not change since it was last solved would get the same cost matrix and the same
  answer: it is not solved again. A sweep in which every permutation is in that state changes
  nothing, so it ends the descent at no cost.
* **Independent permutations together.** Permutations that share no array (an MLP's first and
  third hidden layers; the inner permutations of a ResNet's blocks) do not affect each other's
  costs. In the default ``order="random"`` (the paper's: a random permutation of all of them every
  sweep, from `key`) consecutive independent permutations are solved together, their LAPs in
  threads: exactly the result of visiting them one at a time. ``order="classes"`` visits them in
  fixed classes (a colouring of the dependency graph), builds a class's cost matrices together
  (one jitted call on a device) and solves its LAPs in threads; it converges in fewer sweeps but, on random-init
  MLP pairs, to local optima about 0.5% lower (BENCHMARKS.md), so it is not the default.
* **Incremental cost matrices.** A cost matrix is a constant part (biases, the input side of the
  first layer: computed once) plus one term per neighbour, each kept with the neighbour's
  permutation it was computed for. A solve brings up to date only the terms whose neighbour moved
  since: by a rank-$m$ correction for the $m$ moved units when they are few (see
  `tna_jax.align.costs`), from the weights when they are many or after ``refresh`` corrections, so
  rounding cannot accumulate. The terms are kept in float64 on the host.
* **A faster exact LAP solver** when available (`tna_jax.align.lap`: lapx's Jonker-Volgenant in
  float64, SciPy otherwise).
* **Host cost matrices when the weights are in host memory** (JAX on CPU;
  ``cost_backend="auto"``): BLAS contracts each array in its own layout (GEMMs accumulated per
  convolution tap where the permuted axis sits in the middle: no transposed copies) and beats
  XLA:CPU's dot on these shapes; small problems also skip a jitted call's dispatch. On an
  accelerator the matrices are built there by jitted JAX. Same terms, same steps.
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
from tna_jax.align.visiting import independent_runs, leaves_out_neighbours, order_generator, sweep_batches

PyTree = Any

__all__ = ["weight_matching", "MatchResult", "matching_objective", "select_leaves", "solve_assignment", "solve_nested",
           "ORDERS", "COST_BACKENDS", "FIRST_SWEEPS", "order_generator"]

ORDERS = ("random", "classes")
COST_BACKENDS = ("auto", "host", "device")
FIRST_SWEEPS = ("auto", "forward", "standard")
_MIN_INCREMENTAL_FLOPS = 1e7  # below this a group's matrix is cheaper to rebuild than to track
_THREAD_MIN_SIZE = 128  # LAPs smaller than this are not worth a thread
# Below this many FLOPs per sweep (all cost matrices once) host builds use one BLAS thread: their
# matmuls are tiny, and with NumPy's BLAS threads on a busy machine each stalled on thread
# hand-offs (10x slower). Larger problems let BLAS use every core.
_HOST_MAX_FLOPS = 1e8


class MatchResult(NamedTuple):
    """What the matching functions (`weight_matching`, `activation_matching`, ...) return.

    Attributes:
      perm: ``{name: index array}`` with ``apply_permutation(spec, perm, b) ≈ a``.
      iterations: sweeps over all permutations until one changed nothing (that last sweep
        included), or ``max_iter`` (1 for one-shot methods such as activation matching).
      converged: whether the last sweep changed nothing.
      objective: the objective after each sweep (starting with the identity). For weight
        matching ``Σ_w ⟨A_w, P(B_w)⟩``: the first entry and the one after a forward first sweep
        are computed from the weights, the others are the previous plus every accepted update's
        gain, read off the solved cost matrices (float64 sums of float32 products: within
        float32 rounding of `matching_objective`, which recomputes it from the weights). It
        never falls below the first entry.
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




@jax.jit
def _inner_products(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> jax.Array:
    """``Σ_w ⟨A_w, B_w⟩``: the objective at the identity permutation."""
    return sum((jnp.vdot(a[p].astype(jnp.float32), b[p].astype(jnp.float32)) for p in sorted(a)),
               jnp.zeros((), jnp.float32))


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


def _in_host_memory(*trees: dict[str, Any]) -> bool:
    """Whether every array lives in this process's host memory (NumPy, or JAX on CPU devices and
    fully addressable: a global array of several processes stays with jitted JAX)."""
    return all(not isinstance(x, jax.Array)
               or (x.is_fully_addressable and all(d.platform == "cpu" for d in x.devices()))
               for t in trees for x in t.values())


def _host_view(x: jax.Array) -> np.ndarray:
    """`x` as a float32 NumPy array: for arrays in host memory a zero-copy DLPack view (NumPy's own
    conversion of a JAX array makes a slow copy: at ResNet-20 x16 it cost more than the matching's
    first sweep), else a copy."""
    try:
        view = np.from_dlpack(x)
    except (BufferError, RuntimeError, TypeError, ValueError):  # on an accelerator, or not DLPack-able
        view = np.asarray(x)
    return view if view.dtype == np.float32 else view.astype(np.float32)


@functools.lru_cache(maxsize=1)
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """A small problem's host matmuls are tiny: one BLAS thread each. With several, every call waits
    on a thread hand-off, which on a busy machine made the host path 10x slower (threadpoolctl, from the
    ``fast`` extra; a no-op without it)."""
    controller = _blas_controller()
    return controller.limit(limits=1, user_api="blas") if controller is not None else contextlib.nullcontext()


class _Matcher:
    """The state of one weight-matching run (host copies, cost-matrix terms, versions); not public.

    A tracked permutation's cost matrix is kept as its constant part plus one term per neighbour
    (`costs.sub_plan`), each with the neighbour's permutation it was computed for: a solve brings
    up to date only the terms whose neighbour moved, by a rank-m correction when it moved little,
    else from the weights.
    """

    def __init__(self, spec: PermutationSpec, la: dict[str, jax.Array], lb: dict[str, jax.Array],
                 perm: dict[str, np.ndarray], plans: dict[str, costs_lib.GroupPlan], solver: Solver,
                 incremental: bool | str, refresh: int, tol: float, on_host: bool = False,
                 forward: bool = False):
        self.spec, self.la, self.lb, self.plans = spec, la, lb, plans
        self.on_host = on_host  # every cost matrix built in NumPy from `full_host`
        self.full_host = ({p: _host_view(x) for p, x in la.items()},
                          {p: _host_view(x) for p, x in lb.items()}) if on_host else None
        self.perm = perm
        self.dev = {} if on_host else {k: jnp.asarray(v) for k, v in perm.items()}
        self.solver, self.refresh, self.tol = solver, refresh, tol
        self.incr = {g: bool(incremental) and not p.full and bool(p.single)
                     and (incremental is True or _var_flops(spec, p) >= _MIN_INCREMENTAL_FLOPS)
                     for g, p in plans.items()}
        self.version = dict.fromkeys(plans, 0)
        self.seen: dict[str, dict[str, int]] = {}
        self.const: dict[str, np.ndarray] = {}  # g -> its constant part (float64)
        self.terms: dict[str, dict[str, np.ndarray]] = {}  # g -> neighbour h -> h's term (float64)
        self.synced: dict[str, dict[str, np.ndarray]] = {}  # g -> h -> the permutation of h in that term
        self.updates: dict[tuple[str, str], int] = {}  # rank-m corrections since the term was computed
        self.solves = 0
        # forward first sweep: a matrix leaves out the terms of neighbours never solved yet (not in `seen`)
        self.forward = forward
        self.partial: set[str] = set()  # solved last without some neighbour's term: not clean
        self.partial_solves = 0  # their gains are not the objective's (see `kept`)
        # the sum over solves of the matrix's value at the permutation kept: over a forward sweep
        # (each permutation solved once, against the neighbours solved before it) every array that
        # carries a permutation enters exactly one of these matrices, at its final permutations
        self.kept = 0.0
        self._host: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None = None
        self.host_terms: dict[tuple[str, str, str], costs_lib.HostTerms] = {}
        self.pool: ThreadPoolExecutor | None = None

    # ---- bookkeeping ---------------------------------------------------------------------------
    def restart(self, start: dict[str, np.ndarray]) -> None:
        """Puts the permutations back to `start` (each moved one counts as a change)."""
        for k, v in start.items():
            if not np.array_equal(self.perm[k], v):
                self.perm[k] = v.copy()
                if not self.on_host:
                    self.dev[k] = jnp.asarray(v)
                top = k if k in self.version else self.spec.parent[k]
                self.version[top] += 1

    def clean(self, g: str) -> bool:
        if g in self.partial:
            return False
        seen = self.seen.get(g)
        return seen is not None and all(self.version[h] == v for h, v in seen.items())

    def host(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        if self._host is None and self.on_host:
            self._host = self.full_host
        if self._host is None:
            paths = {t.path for g, p in self.plans.items() if self.incr[g] for _, ts in p.single for t in ts}
            self._host = ({p: _host_view(self.la[p]) for p in paths}, {p: _host_view(self.lb[p]) for p in paths})
        return self._host

    def jobs(self, g: str) -> list[tuple[str, str]]:
        """What brings the cost matrix of `g` up to date, as ``(neighbour, action)``: ``("", "full")``
        (the whole matrix, every time: untracked), ``("", "const")`` (its constant part, once),
        ``(h, "term")`` (the term of neighbour h from the weights) or ``(h, "update")`` (a rank-m
        correction of it)."""
        plan = self.plans[g]
        # forward first visit: the terms of the neighbours solved so far, whether tracked or not
        partial = self.forward and g not in self.seen and leaves_out_neighbours(plan, self.seen)
        if not self.incr[g] and not partial:
            return [("", "full")]
        singles = plan.singles
        out = [] if g in self.terms else [("", "const")]
        have = self.terms.get(g, {})
        for h in singles:
            if h not in have:  # never built, or left out while h was unsolved (forward first sweep)
                if not self.forward or h in self.seen:
                    out.append((h, "term"))
                continue
            moved = int(np.count_nonzero(self.perm[h] != self.synced[g][h]))
            if moved:
                many = moved * 2 > self.spec.size[h] or self.updates[g, h] >= self.refresh
                out.append((h, "term" if many else "update"))
        return out

    def part(self, g: str, h: str, action: str) -> tuple[costs_lib.GroupPlan, str]:
        """The plan and part `costs.group_costs` builds for one job."""
        if action == "term":
            return costs_lib.sub_plan(self.plans[g], h), "var"
        return self.plans[g], "all" if action == "full" else "const"

    # ---- one batch of independent permutations -------------------------------------------------
    def dispatch(self, todo: list[tuple[str, list[tuple[str, str]]]], together: bool) -> dict[tuple[str, str], Any]:
        """Starts the jitted builds the batch needs (asynchronously); ``{(group, neighbour): output}``."""
        need = [(g, h, a) for g, jobs in todo for h, a in jobs if a != "update"]
        if not need or self.on_host:
            return {}
        if together and len(need) > 1:
            plans, parts = zip(*(self.part(g, h, a) for g, h, a in need))
            outs = costs_lib.build_fn(self.spec, plans, parts)(self.la, self.lb, self.dev)
            return {(g, h): out for (g, h, _), out in zip(need, outs)}
        # one program per (permutation, part): a run compiles nothing new once each has been built once
        out = {}
        for g, h, a in need:
            plan, part = self.part(g, h, a)
            out[g, h] = costs_lib.build_fn(self.spec, (plan,), (part,))(self.la, self.lb, self.dev)[0]
        return out

    def host_part(self, g: str, h: str, action: str) -> Any:
        """One job's matrix built in NumPy (``on_host``)."""
        plan, part = self.part(g, h, action)
        if (g, h, part) not in self.host_terms:
            self.host_terms[g, h, part] = costs_lib.host_terms(self.spec, plan, part, *self.full_host)
        c = costs_lib.host_costs(self.host_terms[g, h, part], self.perm)
        return (c, {}) if action == "full" else c

    def current_cost(self, g: str, jobs: list[tuple[str, str]], outs: dict[tuple[str, str], Any]) -> np.ndarray:
        """Brings the tracked terms of `g` up to date and returns its cost matrix (float64)."""
        for h, action in jobs:
            if action == "update":
                ha, hb = self.host()
                rows = np.flatnonzero(self.perm[h] != self.synced[g][h])
                self.terms[g][h] += costs_lib.rank_update(self.spec, self.plans[g].singles[h], ha, hb, rows,
                                                          self.perm[h][rows], self.synced[g][h][rows])
                self.updates[g, h] += 1
            else:
                out = self.host_part(g, h, action) if self.on_host else outs[g, h]
                if action == "const":
                    self.const[g], self.terms[g], self.synced[g] = np.asarray(out, np.float64), {}, {}
                    continue
                self.terms[g][h] = np.asarray(out, np.float64)
                self.updates[g, h] = 0
            self.synced[g][h] = self.perm[h].copy()
        cost = self.const[g].copy()
        for term in self.terms[g].values():
            cost += term
        return cost

    def cost_matrix(self, g: str, jobs: list[tuple[str, str]], outs: dict[tuple[str, str], Any]
                    ) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
        """The up-to-date cost matrix of `g` (float64) and, for nested permutations, the children's terms."""
        if jobs == [("", "full")]:
            c0, cc = self.host_part(g, "", "full") if self.on_host else outs[g, ""]
            children = {k: np.asarray(v, np.float64) for k, v in cc.items()} if self.plans[g].children else None
            return np.asarray(c0, np.float64), children
        return self.current_cost(g, jobs, outs), None

    def assign(self, g: str, cost: np.ndarray, children: dict[str, np.ndarray] | None
               ) -> tuple[str, float, dict[str, np.ndarray], float]:
        """Solves the LAP of `g`: ``(g, value of the current permutation, new permutations, value)``."""
        if children is not None:
            old = nested_value(cost, children, self.perm[g], {k: self.perm[k] for k in children})
            new, kids, value = solve_nested(cost, children, self.solver)
            return g, old, {g: new, **kids}, value
        old = float(cost[np.arange(self.plans[g].size), self.perm[g]].sum())
        new, value = solve_assignment(cost, self.solver)
        return g, old, {g: new}, value

    def run_batch(self, batch: list[str], together: bool) -> float:
        """Solves the permutations of `batch` that are not clean; returns the objective's gain."""
        todo = [(g, self.jobs(g)) for g in batch if not self.clean(g)]
        if not todo:
            return 0.0
        outs = self.dispatch(todo, together)
        # matrices one after another (a host build's BLAS uses every core already), LAPs in threads
        problems = [(g, *self.cost_matrix(g, jobs, outs)) for g, jobs in todo]
        if self.pool is not None and len(todo) > 1 and max(self.plans[g].size for g, _ in todo) >= _THREAD_MIN_SIZE:
            results = list(self.pool.map(lambda problem: self.assign(*problem), problems))
        else:
            results = [self.assign(*problem) for problem in problems]
        jobs_of = dict(todo)
        for g, _, _, _ in results:  # what each was solved against, before any of them is accepted
            self.seen[g] = {h: self.version[h] for h in self.plans[g].deps}
            if jobs_of[g] != [("", "full")] and len(self.terms[g]) < len(self.plans[g].single):
                self.partial.add(g)
                self.partial_solves += 1
            else:
                self.partial.discard(g)
            if not self.incr[g]:  # an untracked matrix is rebuilt whole at its next solve: keep no parts
                for parts in (self.const, self.terms, self.synced):
                    parts.pop(g, None)
        gain = 0.0
        for g, old, updates, value in results:
            self.solves += 1
            if value > old + self.tol * max(1.0, abs(old)):
                gain += value - old
                self.kept += value
                self.version[g] += 1
                for k, v in updates.items():
                    self.perm[k] = np.asarray(v, np.int32)
                    if not self.on_host:
                        self.dev[k] = jnp.asarray(self.perm[k])
            else:
                self.kept += old
        return gain


def _check_options(max_iter: Any, order: Any, refresh: Any, threads: Any, incremental: Any, cost_backend: Any,
                   first_sweep: Any) -> None:
    for name, value, lo in (("max_iter", max_iter, 1), ("refresh", refresh, 1), ("threads", threads, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {value!r}.")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}.")
    if incremental not in (True, False, "auto"):
        raise ValueError(f"incremental must be True, False or 'auto'; got {incremental!r}.")
    if cost_backend not in COST_BACKENDS:
        raise ValueError(f"cost_backend must be one of {COST_BACKENDS}; got {cost_backend!r}.")
    if first_sweep not in FIRST_SWEEPS:
        raise ValueError(f"first_sweep must be one of {FIRST_SWEEPS}; got {first_sweep!r}.")


def weight_matching(spec: PermutationSpec, a: PyTree, b: PyTree, key: jax.Array, max_iter: int = 100, *,
                    collections: tuple[str, ...] = ("params",), init: Permutation | None = None,
                    tol: float = 1e-9, order: str = "random", solver: str | Solver = "auto",
                    incremental: bool | str = "auto", refresh: int = 16, threads: int = 2,
                    cost_backend: str = "auto", first_sweep: str = "auto") -> MatchResult:
    """Permutes model B's hidden units to match model A's weights (Git Re-Basin, weight matching).

    Args:
      spec: the permutation spec of the architecture (`tna_jax.align.permutation_spec`).
      a, b: the two models' variables (``{"params": ..., ["batch_stats": ...]}``).
      key: PRNG key for the visiting order (``order="random"``, drawn by `order_generator`;
        unused by ``"classes"`` and by a forward first sweep).
      max_iter: at most this many sweeps.
      collections: which collections enter the objective (default the parameters; BatchNorm
        statistics are permuted by ``apply_permutation`` but not matched).
      init: starting permutation (default the identity).
      first_sweep: ``"forward"`` (the first sweep in the spec's order, input to output, each
        permutation solved against its constant terms and the neighbours solved before it),
        ``"standard"`` (the paper's: the first sweep like the others, against every neighbour)
        or ``"auto"``: forward from the identity, standard from an `init` (whose neighbours are
        already meaningful).
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
      refresh: recompute a tracked term from the weights after this many rank-m corrections.
      threads: solve up to this many independent assignment problems at once.
      cost_backend: where cost matrices are built: ``"device"`` (jitted JAX), ``"host"`` (NumPy;
        plain permutations only) or ``"auto"``: the host when both models' arrays are in host
        memory (NumPy, or JAX on CPU) and no permutation is nested, since there NumPy's BLAS
        builds them faster than XLA:CPU; the device otherwise. Same matrices up to float32
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
    _check_options(max_iter, order, refresh, threads, incremental, cost_backend, first_sweep)
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
    on_host = cost_backend == "host" or (cost_backend == "auto" and not nested and _in_host_memory(la, lb))
    one_blas_thread = on_host and _sweep_flops(spec, plans, list(la)) < _HOST_MAX_FLOPS
    forward = first_sweep == "forward" or (first_sweep == "auto" and init is None)
    m = _Matcher(spec, la, lb, perm, plans, solve, incremental, int(refresh), float(tol), on_host=on_host,
                 forward=forward)
    names = list(plans)
    classes = costs_lib.colour_classes(plans) if order == "classes" else []
    orders = order_generator(key)

    def objective_now(identity: bool = False) -> float:
        if identity:  # no gathers needed: a plain sum of inner products
            if on_host:
                return sum(float(np.vdot(x, m.full_host[1][p])) for p, x in sorted(m.full_host[0].items()))
            return float(_inner_products(la, lb))
        if on_host:
            return _host_objective(spec, perm, *m.full_host)
        return matching_objective(spec, perm, a, b, collections=collections)

    objective = [objective_now(identity=init is None)]
    # After a forward sweep the objective is the sum of the kept values (`_Matcher.kept`; every
    # array of a spec carries a permutation) when every matrix is a sum of constant and
    # per-neighbour terms; otherwise (nested permutations, an array carrying one twice or three) it
    # is computed from the weights, which at ResNet-20 x16 costs a tenth of the matching.
    exact_forward = forward and not any(p.full for p in plans.values())
    start = {k: v.copy() for k, v in perm.items()}
    running, converged, it = objective[0], False, 0
    threaded = threads > 1 and max(p.size for p in plans.values()) >= _THREAD_MIN_SIZE
    m.pool = ThreadPoolExecutor(int(threads)) if threaded else None
    try:
        with _one_blas_thread() if one_blas_thread else contextlib.nullcontext():
            for it in range(1, int(max_iter) + 1):  # noqa: B007 (the count is returned)
                before, partial = dict(m.version), m.partial_solves
                m.kept = 0.0
                sweep = (independent_runs(names, plans) if forward and it == 1
                         else sweep_batches(order, names, plans, classes, orders))
                for batch in sweep:
                    running += m.run_batch(batch, together=order == "classes")
                if m.partial_solves != partial:  # gains on partial matrices are not the objective's
                    running = m.kept if exact_forward and it == 1 else objective_now()
                    if running < objective[0]:  # keep the guarantee: never worse than the start
                        m.restart(start)
                        running = objective[0]
                    objective.append(running)
                    continue
                objective.append(running)
                if m.version == before:  # nothing accepted: every permutation is optimal given the others
                    converged = True
                    break
    finally:
        if m.pool is not None:
            m.pool.shutdown()
    return MatchResult(perm=perm, iterations=it, converged=converged, objective=objective, solves=m.solves)
