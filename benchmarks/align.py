"""Weight matching: tna_jax.align against the Git Re-Basin authors' algorithm, on identical pairs.

The reference is the authors' ``weight_matching`` (git-re-basin ``src/weight_matching.py``) as
they wrote it, in NumPy: every sweep visits the permutations in a fresh random order; each step
builds the permutation's cost matrix from the weights (``moveaxis(..).reshape`` matrices of every
array touching it, the other permutations applied with ``take``), solves it with a fresh SciPy
``linear_sum_assignment``, always keeps the new assignment, and counts progress when
``newL > oldL + 1e-12``; it stops after a sweep without progress. (Their ``oldL``/``newL`` are
``vdot(A, eye(n)[perm])``; here the same values are read off ``A`` by indexing, which only makes
the reference faster.)

tna_jax runs `tna_jax.align.weight_matching` with its defaults (the paper's random order, skipped
solves, independent permutations together, incremental cost matrices, the fastest installed exact
LAP solver). Both start from the identity on the same random-init pair per seed (Flax init, keys
``2s`` and ``2s + 1``); the two are run one after the other, in alternating order per seed.

Reported per case (medians over seeds): sweeps of each, the per-sweep ratio
``(t_ref / sweeps_ref) / (t_ours / sweeps_ours)``, the to-convergence ratio ``t_ref / t_ours``,
the objective ratio ``ours / ref`` (median and minimum), and the floor of the reference
algorithm: ``F = FLOPs of one sweep's cost matrices / measured matmul peak + SciPy LAP seconds
per sweep`` (measured inside the reference run). ``ref_floor_fraction = F / reference seconds
per sweep`` says how close the reference is to its own floor; ``ours_over_floor = F / our seconds
per sweep`` how far below that floor tna_jax goes (> 1: faster than the old algorithm can be).

Seconds per sweep compare the work of a sweep only when both sweep alike. Our default descent
starts with a forward sweep and converges in far fewer sweeps (an MLP: 2 against 20-28), each
doing more of the work the reference spreads over many; so the run is repeated with the paper's
first sweep (``first_sweep="standard"``: every sweep like the reference's) and
``per_sweep_ratio_paper_first_sweep`` is that run's time per sweep against the reference's. For
the default run, ``ours_floor_fraction`` is our own floor (every cost matrix built once, which no
exact descent from random neighbours can avoid, at the matmul peak, plus the seconds of the LAPs
it solved) over its time, and ``per_sweep_ceiling`` the per-sweep ratio that floor would give:
with two sweeps it cannot exceed about twice the reference's seconds per sweep over the floor.

    python benchmarks/align.py                 # all cases, 3 seeds (about 20 min on 2 idle cores)
    python benchmarks/align.py --quick         # MLP w=512 and ResNet-20 x1, 3 seeds (CI guard)
    python benchmarks/align.py --cases "MLP w=2048" --seeds 5
    python benchmarks/align.py --shared-order  # the reference visits in our order: same path, speed alone
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from benchmarks.common import print_table, write_json  # noqa: E402
from tna_jax import align, models  # noqa: E402
from tna_jax import tree as tree_lib  # noqa: E402
from tna_jax.align.lap import get_solver  # noqa: E402
from tna_jax.align.weight_matching import order_generator  # noqa: E402


def reference_weight_matching(perm_to_axes, axes_to_perm, params_a, params_b, rng, max_iter=100):
    """The authors' algorithm in NumPy: ``params_*`` map names to arrays (viewed in the spec's
    expanded shapes). Returns ``(perm, sweeps, LAP seconds)``."""
    perm_sizes = {p: params_a[axes[0][0]].shape[axes[0][1]] for p, axes in perm_to_axes.items()}
    perm = {p: np.arange(n) for p, n in perm_sizes.items()}
    perm_names = list(perm)

    def get_permuted_param(k, params, except_axis=None):
        w = params[k]
        for axis, p in enumerate(axes_to_perm[k]):
            if axis == except_axis or p is None:
                continue
            w = np.take(w, perm[p], axis=axis)
        return w

    lap_s = 0.0
    iteration = 0
    for iteration in range(1, max_iter + 1):  # noqa: B007 (the count is returned)
        progress = False
        for p_ix in rng.permutation(len(perm_names)):
            p = perm_names[p_ix]
            n = perm_sizes[p]
            a = np.zeros((n, n), np.float32)
            for wk, axis in perm_to_axes[p]:
                w_a = np.moveaxis(params_a[wk], axis, 0).reshape((n, -1))
                w_b = np.moveaxis(get_permuted_param(wk, params_b, except_axis=axis), axis, 0).reshape((n, -1))
                a += w_a @ w_b.T
            t0 = time.perf_counter()
            _, ci = linear_sum_assignment(a, maximize=True)
            lap_s += time.perf_counter() - t0
            old = float(a[np.arange(n), perm[p]].astype(np.float64).sum())
            new = float(a[np.arange(n), ci].astype(np.float64).sum())
            progress = progress or new > old + 1e-12
            perm[p] = ci
        if not progress:
            break
    return perm, iteration, lap_s


def timed_solver():
    """The solver weight_matching picks by default, wrapped to record the seconds of every solve
    (``(times, solver)``; solves in threads each count their own time)."""
    solve, times = get_solver("auto"), []

    def timed(cost):
        t0 = time.perf_counter()
        cols = solve(cost)
        times.append(time.perf_counter() - t0)
        return cols

    return times, timed


class SharedOrder:
    """A stand-in for the reference's ``rng`` that draws weight_matching's visiting order (the
    same key, sweep by sweep): both then take the same path, so the ratios compare speed alone,
    free of how many sweeps each drawn order happens to need."""

    def __init__(self, spec, names, key, max_iter):  # drawn here, outside the reference's timing
        ours = [g for g, _ in spec.groups()]
        draws = order_generator(key)
        self.orders = [np.array([names.index(ours[int(i)]) for i in draws.permutation(len(ours))])
                       for _ in range(max_iter)]
        self.sweep = 0

    def permutation(self, n):
        self.sweep += 1
        return self.orders[self.sweep - 1]


def matmul_peak_gflops(n: int = 2048, rounds: int = 5) -> float:
    """The best of NumPy's and jitted JAX's float32 matmul rate on two distinct ``n x n`` matrices.

    ``x @ x.T`` would let BLAS compute half of a symmetric product and report twice the rate; NumPy
    is timed before any JAX call, whose thread pool keeps spinning for a while after each call and
    slows the BLAS threads beside it."""
    rng = np.random.default_rng(0)
    x, y = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))

    def best_of(fn):
        fn()
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    host = best_of(lambda: x @ y)
    f = jax.jit(lambda u, v: u @ v)
    jx, jy = jnp.asarray(x), jnp.asarray(y)
    device = best_of(lambda: f(jx, jy).block_until_ready())
    return 2 * n**3 / min(host, device) / 1e9


def sweep_flops(spec) -> float:
    """FLOPs of building every cost matrix once (``2 n |w|`` per array and axis, parameters only)."""
    leaves = spec.leaves
    return float(sum(2 * spec.size[p] * int(np.prod(leaves[path].shape))
                     for p, axes in spec.perm_to_axes.items() for path, _ in axes if path.startswith("params/")))


def run_case(name, cfg, shape, seeds, max_iter, peak, shared_order=False):
    net = models.build(cfg, shape, 10)
    spec = align.permutation_spec(net)
    init = jax.jit(net.init)
    leaves = spec.leaves
    p2a = {p: [(path, ax) for path, ax in axes if path.startswith("params/")] for p, axes in spec.perm_to_axes.items()}
    a2p = {path: perms for path, perms in spec.axes_to_perm.items() if path.startswith("params/")}
    flops = sweep_flops(spec)
    per_seed = []
    t_case = time.time()
    for s in seeds:
        a, b = init(jax.random.key(2 * s)), init(jax.random.key(2 * s + 1))
        host_a, host_b = ({n: np.asarray(x).reshape(leaves[n].factors) for n, x in tree_lib.named_leaves(v) if n in a2p}
                          for v in (a, b))
        if s == seeds[0]:  # compile once, outside the timings
            align.weight_matching(spec, a, b, jax.random.key(s), max_iter=2)
        out = {}

        def ours(a=a, b=b, s=s, out=out):
            lap_times, solver = timed_solver()
            t0 = time.perf_counter()
            # with a shared order the same path needs the paper's first sweep too
            res = align.weight_matching(spec, a, b, jax.random.key(s), max_iter=max_iter, solver=solver,
                                        first_sweep="standard" if shared_order else "auto")
            dt = time.perf_counter() - t0
            # recomputed from the weights like the reference's, outside both timings
            out["ours"] = (dt, res.iterations, align.matching_objective(spec, res.perm, a, b), res.converged, res.solves,
                           sum(lap_times))

        def paper(a=a, b=b, s=s, out=out):
            # the paper's first sweep (against every neighbour, still at the identity): the same
            # kind of sweeps as the reference, so seconds per sweep compare the work of one sweep
            t0 = time.perf_counter()
            res = align.weight_matching(spec, a, b, jax.random.key(s), max_iter=max_iter, first_sweep="standard")
            out["paper"] = (time.perf_counter() - t0, res.iterations)

        def ref(a=a, b=b, s=s, out=out, host_a=host_a, host_b=host_b):
            rng = SharedOrder(spec, list(p2a), jax.random.key(s), max_iter) if shared_order else np.random.default_rng(s)
            t0 = time.perf_counter()
            perm, sweeps, lap_s = reference_weight_matching(p2a, a2p, host_a, host_b, rng, max_iter)
            dt = time.perf_counter() - t0
            perm = {k: np.asarray(v, np.int32) for k, v in perm.items()}
            out["ref"] = (dt, sweeps, align.matching_objective(spec, perm, a, b), lap_s)

        runs = (ref, ours) if shared_order else (ref, ours, paper)  # shared order: ours is the paper's already
        for fn in (runs if s % 2 == 0 else runs[::-1]):
            fn()
        (t_o, sw_o, obj_o, conv_o, solves, lap_o), (t_r, sw_r, obj_r, lap_r) = out["ours"], out["ref"]
        t_p, sw_p = out.get("paper", (t_o, sw_o))
        floor = flops / (peak * 1e9) + lap_r / sw_r
        # our own floor: every matrix built once (no exact descent from random neighbours can build
        # less) plus the LAPs our run solved, with the solver it used
        ours_floor = flops / (peak * 1e9) + lap_o
        per_seed.append({"seed": s, "ours_s": t_o, "ref_s": t_r, "sweeps_ours": sw_o, "sweeps_ref": sw_r,
                         "solves_ours": solves, "solves_ref": sw_r * len(p2a), "converged_ours": conv_o,
                         "objective_ours": obj_o, "objective_ref": obj_r, "ref_lap_s": lap_r,
                         "per_sweep_ratio": (t_r / sw_r) / (t_o / sw_o), "to_convergence_ratio": t_r / t_o,
                         "paper_first_sweep_s": t_p, "sweeps_paper_first_sweep": sw_p,
                         "per_sweep_ratio_paper_first_sweep": (t_r / sw_r) / (t_p / sw_p),
                         "objective_ratio": obj_o / obj_r, "floor_s_per_sweep": floor,
                         "ref_floor_fraction": floor / (t_r / sw_r), "ours_over_floor": floor / (t_o / sw_o),
                         "ours_lap_s": lap_o, "ours_floor_s": ours_floor, "ours_floor_fraction": ours_floor / t_o,
                         "per_sweep_ceiling": (t_r / sw_r) / (ours_floor / sw_o)})
        print(f"  {name} seed {s}: ref {t_r:.2f}s/{sw_r} sweeps, ours {t_o:.2f}s/{sw_o} sweeps "
              f"(per sweep {per_seed[-1]['per_sweep_ratio']:.2f}x, to convergence {t_r / t_o:.2f}x, "
              f"paper's first sweep {t_p:.2f}s/{sw_p} sweeps: per sweep "
              f"{per_seed[-1]['per_sweep_ratio_paper_first_sweep']:.2f}x, "
              f"objective {obj_o / obj_r:.5f}); load {os.getloadavg()[0]:.2f}", flush=True)

    def med(k):
        return statistics.median(r[k] for r in per_seed)

    return {"model": name, "params": tree_lib.tree_size(init(jax.random.key(0))["params"]), "perms": len(spec),
            "seeds": len(seeds), "max_iter": max_iter, "sweeps_ref": med("sweeps_ref"), "sweeps_ours": med("sweeps_ours"),
            "solves_ours": med("solves_ours"), "solves_ref": med("solves_ref"), "ref_s": med("ref_s"), "ours_s": med("ours_s"),
            "per_sweep_ratio": med("per_sweep_ratio"), "to_convergence_ratio": med("to_convergence_ratio"),
            "sweeps_paper_first_sweep": med("sweeps_paper_first_sweep"),
            "per_sweep_ratio_paper_first_sweep": med("per_sweep_ratio_paper_first_sweep"),
            "objective_ratio": med("objective_ratio"), "objective_ratio_min": min(r["objective_ratio"] for r in per_seed),
            "ref_floor_fraction": med("ref_floor_fraction"), "ours_over_floor": med("ours_over_floor"),
            "ours_floor_fraction": med("ours_floor_fraction"), "per_sweep_ceiling": med("per_sweep_ceiling"),
            "gflop_per_sweep": flops / 1e9, "converged": all(r["converged_ours"] for r in per_seed),
            "per_seed": per_seed, "wall_s": time.time() - t_case}


CASES = [  # name, model config, input shape, max sweeps, large (the targets apply)
    ("MLP w=512", {"name": "mlp", "depth": 3, "width": 512}, (784,), 100, False),
    ("MLP w=2048", {"name": "mlp", "depth": 3, "width": 2048}, (784,), 100, True),
    ("MLP w=4096", {"name": "mlp", "depth": 3, "width": 4096}, (784,), 100, True),
    ("ResNet-20 x1", {"name": "resnet20", "width": 1}, (32, 32, 3), 100, False),
    ("ResNet-20 x16", {"name": "resnet20", "width": 16}, (32, 32, 3), 100, True),
]
QUICK = ("MLP w=512", "ResNet-20 x1")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default: all, or the quick ones)")
    parser.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    parser.add_argument("--shared-order", action="store_true",
                        help="the reference visits the permutations in weight_matching's order (same path: speed alone)")
    args = parser.parse_args()
    wanted = args.cases or [c[0] for c in CASES if not args.quick or c[0] in QUICK]
    load = os.getloadavg()[0]
    peak = matmul_peak_gflops()
    print(f"matmul peak {peak:.0f} GFLOP/s; load {os.getloadavg()}", flush=True)
    rows, large = [], set()
    for name, cfg, shape, max_iter, is_large in CASES:
        if name in wanted:
            rows.append(run_case(name, cfg, shape, list(range(args.seeds)), max_iter, peak, args.shared_order))
            if is_large:
                large.add(name)
    cols = ["model", "perms", "sweeps_ref", "sweeps_ours", "solves_ref", "solves_ours", "ref_s", "ours_s",
            "per_sweep_ratio", "to_convergence_ratio", "sweeps_paper_first_sweep", "per_sweep_ratio_paper_first_sweep",
            "objective_ratio", "objective_ratio_min",
            "ref_floor_fraction", "ours_over_floor", "ours_floor_fraction", "per_sweep_ceiling"]
    table = print_table(rows, cols)
    small = [r for r in rows if r["model"] not in large]
    big = [r for r in rows if r["model"] in large]

    def lowest(rs, key):
        return min((r[key] for r in rs), default=None)

    big_mlps = [r for r in big if r["model"].startswith("MLP")]
    ratios = {"small_to_convergence_min": lowest(small, "to_convergence_ratio"),
              "x16_per_sweep": lowest([r for r in big if r["model"] == "ResNet-20 x16"], "per_sweep_ratio"),
              "mlp_large_per_sweep_paper_first_sweep_min": lowest(big_mlps, "per_sweep_ratio_paper_first_sweep"),
              "mlp_large_per_sweep_default_min": lowest(big_mlps, "per_sweep_ratio"),
              "large_to_convergence_min": lowest(big, "to_convergence_ratio"),
              "objective_min": lowest(rows, "objective_ratio")}
    write_json("align", {"rows": rows, "table": table, "quick": args.quick, "shared_order": args.shared_order, "ratios": ratios,
                         "matmul_peak_gflops": peak, "load_start": load, "load_end": os.getloadavg()[0],
                         "note": "random-init pairs, identical for both; medians over seeds; floor = one sweep's "
                                 "cost-matrix FLOPs at the measured matmul peak + the reference's SciPy LAP time "
                                 "per sweep"}, args.out)


if __name__ == "__main__":
    main()
