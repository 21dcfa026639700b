"""Weight matching: tna_jax.align (jitted JAX cost matrices) against a reference in the style of the
original git-re-basin code (a Python loop over permutations, NumPy cost matrices), same run.

Both variants solve the same problem with the same algorithm: the same spec, the same order of
permutations in every sweep, the same exact assignment solver (SciPy's linear_sum_assignment) and
the same stopping rule. They differ in how the cost matrices are built: the reference applies the
other permutations with ``np.take`` and multiplies ``moveaxis(..).reshape`` matrices per array, as
``weight_matching.py`` of git-re-basin does (its ``oldL``/``newL`` use a dense ``eye(n)[perm]``;
here both variants read the objective off the cost matrix instead); tna_jax builds all arrays'
contributions of a permutation in one jitted function.

Models: MLPs 784-w-w-w-10 (w = 512, 2048, 4096; git-re-basin's MNIST MLP at w = 512) and ResNet-20
at width 1 and 16 (32x32x3 inputs), two independent random initialisations each (matching trained
models converges in fewer sweeps; the cost per sweep is the same). Reported: median seconds per
call (interleaved rounds), the ratio, sweeps to converge of each variant, and the extra peak
resident memory of one warm call (Linux VmHWM reset before the call, minus the resident size
before it). Sweeps are capped where a full run would take too long on 2 shared CPU cores (the cap
is in the table and JSON).

    python benchmarks/align.py            # all cases
    python benchmarks/align.py --quick    # MLP 512 and ResNet-20x1 only, 2 rounds, no peak memory
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from benchmarks.common import print_table, time_interleaved, write_json  # noqa: E402
from tna_jax import align, models  # noqa: E402
from tna_jax import tree as tree_lib  # noqa: E402


def reference_weight_matching(perm_to_axes, axes_to_perm, params_a, params_b, orders, max_iter):
    """git-re-basin's algorithm, NumPy edition: ``params_*`` map '/'-joined names to arrays."""
    perm_sizes = {p: params_a[axes[0][0]].shape[axes[0][1]] for p, axes in perm_to_axes.items()}
    perm = {p: np.arange(n) for p, n in perm_sizes.items()}
    names = list(perm)

    def get_permuted_param(k, params, except_axis=None):
        w = params[k]
        for axis, p in enumerate(axes_to_perm[k]):
            if axis == except_axis or p is None:
                continue
            w = np.take(w, perm[p], axis=axis)
        return w

    iteration = 0
    for iteration in range(1, max_iter + 1):
        progress = False
        for p_ix in orders(iteration):
            p = names[p_ix]
            n = perm_sizes[p]
            a = np.zeros((n, n), np.float32)
            for wk, axis in perm_to_axes[p]:
                w_a = params_a[wk]
                w_b = get_permuted_param(wk, params_b, except_axis=axis)
                w_a = np.moveaxis(w_a, axis, 0).reshape((n, -1))
                w_b = np.moveaxis(w_b, axis, 0).reshape((n, -1))
                a += w_a @ w_b.T
            _, ci = linear_sum_assignment(a, maximize=True)
            a64 = a.astype(np.float64)
            old = a64[np.arange(n), perm[p]].sum()
            new = a64[np.arange(n), ci].sum()
            if new > old + 1e-9 * max(1.0, abs(old)):
                progress = True
                perm[p] = ci
        if not progress:
            break
    return perm, iteration


def vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def peak_mb(fn) -> float:
    """Extra peak resident memory (MB) of one call of `fn`, measured with VmHWM."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float("nan")
    base = vm_kb("VmRSS")
    jax.block_until_ready(fn())
    return (vm_kb("VmHWM") - base) / 1024


def setup(net, max_iter):
    """Both variants as zero-argument callables on one random-init pair."""
    spec = align.permutation_spec(net)
    init = jax.jit(net.init)
    a, b = init(jax.random.key(0)), init(jax.random.key(1))
    key = jax.random.key(42)
    groups = [g for g, _ in spec.groups()]

    def orders(it):  # the order tna_jax.align.weight_matching visits the permutations in
        return [spec.names.index(groups[int(i)]) for i in np.asarray(
            jax.random.permutation(jax.random.fold_in(key, it), len(groups)))]

    named_a = {n: np.asarray(x) for n, x in tree_lib.named_leaves(a) if n.startswith("params/")}
    named_b = {n: np.asarray(x) for n, x in tree_lib.named_leaves(b) if n.startswith("params/")}
    p2a = {p: [(path, ax) for path, ax in axes if path.startswith("params/")]
           for p, axes in spec.perm_to_axes.items()}
    a2p = {path: perms for path, perms in spec.axes_to_perm.items() if path.startswith("params/")}
    out = {}

    def ours():
        res = align.weight_matching(spec, a, b, key, max_iter=max_iter)
        out["ours"] = res
        return res.perm

    def ref():
        perm, it = reference_weight_matching(p2a, a2p, named_a, named_b, orders, max_iter)
        out["ref"] = (perm, it)
        return perm

    return spec, a, {"tna_jax": ours, "reference": ref}, out


def memory_child(index: int, variant: str) -> None:
    """Run in a fresh process: one cold call of `variant` on case `index`; prints the peak (MB)."""
    name, cfg, shape, max_iter, _ = CASES[index]
    _, _, fns, _ = setup(models.build(cfg, shape, 10), max_iter)
    print(f"PEAK_MB {peak_mb(fns[variant]):.1f}")


def child_peak(index: int, variant: str) -> float:
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", str(index), variant],
                         capture_output=True, text=True, env=env, timeout=3600)
    for line in out.stdout.splitlines():
        if line.startswith("PEAK_MB"):
            return float(line.split()[1])
    print(out.stderr[-2000:])
    return float("nan")


def case(index, net, max_iter, rounds, memory=True):
    name = CASES[index][0]
    spec, a, fns, out = setup(net, max_iter)
    t0 = time.time()
    times = time_interleaved(fns, rounds=rounds, warmup=1)
    # peak memory needs a fresh process per variant (a cold call); --quick leaves it out
    mem = {v: child_peak(index, v) if memory else None for v in fns}
    same = all(np.array_equal(out["ours"].perm[p], out["ref"][0][p]) for p in spec.names)
    row = {
        "model": name, "params": tree_lib.tree_size(a["params"]), "perms": len(spec),
        "max_iter": max_iter,
        "sweeps_tna_jax": out["ours"].iterations, "sweeps_reference": out["ref"][1],
        "converged": out["ours"].converged, "same_result": same,
        "tna_jax_s": times["tna_jax"]["median_s"], "reference_s": times["reference"]["median_s"],
        "speedup": times["reference"]["median_s"] / times["tna_jax"]["median_s"],
        "tna_jax_peak_mb": mem["tna_jax"], "reference_peak_mb": mem["reference"],
        "rounds": rounds, "wall_s": time.time() - t0,
    }
    del spec
    print(f"{name}: {row['speedup']:.2f}x ({row['tna_jax_s']:.2f}s vs {row['reference_s']:.2f}s), "
          f"sweeps {row['sweeps_tna_jax']}/{row['sweeps_reference']}, same result {same}", flush=True)
    return row


CASES = [
    ("MLP w=512", {"name": "mlp", "depth": 3, "width": 512}, (784,), 100, 5),
    ("MLP w=2048", {"name": "mlp", "depth": 3, "width": 2048}, (784,), 100, 3),
    ("MLP w=4096", {"name": "mlp", "depth": 3, "width": 4096}, (784,), 3, 2),
    ("ResNet-20 x1", {"name": "resnet20", "width": 1}, (32, 32, 3), 100, 5),
    ("ResNet-20 x16", {"name": "resnet20", "width": 16}, (32, 32, 3), 3, 2),
]
QUICK = ("MLP w=512", "ResNet-20 x1")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory-child", nargs=2, metavar=("CASE", "VARIANT"))
    parser.add_argument("--out", default=None, help="results directory (default: benchmarks/results)")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(int(args.memory_child[0]), args.memory_child[1])
        return
    rows = []
    for index, (name, cfg, shape, max_iter, rounds) in enumerate(CASES):
        if args.quick and name not in QUICK:
            continue
        if cfg["name"] not in models.REGISTRY:
            print(f"{name}: model {cfg['name']!r} is not in tna_jax.models yet; skipped.")
            continue
        rows.append(case(index, models.build(cfg, shape, 10), max_iter, 2 if args.quick else rounds,
                         memory=not args.quick))
    cols = ["model", "params", "perms", "max_iter", "sweeps_tna_jax", "sweeps_reference", "same_result",
            "tna_jax_s", "reference_s", "speedup", "tna_jax_peak_mb", "reference_peak_mb"]
    table = print_table(rows, cols)
    speedups = [r["speedup"] for r in rows]
    write_json("align", {"rows": rows, "table": table, "quick": args.quick,
                         "ratios": {"speedup_min": min(speedups) if speedups else None},
                         "note": "random-init pairs; max_iter caps the sweeps where a full run is too slow; "
                                 "peak memory: extra resident memory of one cold call in a fresh process"},
               args.out)


if __name__ == "__main__":
    main()
