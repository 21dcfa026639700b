"""LMC paths vmapped over (pair, α) against a Python loop, and the memory that chunking saves.

In one process, interleaved (benchmarks.common.time_interleaved), for 10 pairs of 5 MLPs and 25 α
each (250 interpolated models), at two sizes: ``small`` (40-32-32-10 on 256 examples: the loop
pays mostly for dispatch; the >= 5x target applies here) and ``mnist1d`` (40-128-128-10 on the
1000 test examples of the quickstart: compute-bound on 2 cores, reported beside it):

  * ``vmapped, chunk=auto``: :func:`tna_jax.lmc.pairwise_barriers` as users call it (one compiled
    program; ``lax.map`` over chunks sized by :func:`tna_jax.chunking.auto_chunk`),
  * ``vmapped, chunk=None``: all 250 points in one vmap (batched matmuls),
  * ``vmapped, chunk=25``: ``lax.map`` over blocks of 25 points,
  * ``python loop``: a loop over pairs and α calling one jitted "interpolate, then evaluate"
    function per point, with the same ``eval_fn`` (results collected, one sync at the end: the
    fastest loop one can write, not the usual one that syncs every point);
  * ``PyTorch loop``: the same MLPs as ``torch.nn`` modules, a loop over pairs and α that
    interpolates the state dicts and evaluates loss and accuracy under ``torch.no_grad`` (the way
    PyTorch LMC code is usually written; torch from the ``bench`` extra, skipped without it).

Memory: XLA's compiled memory analysis of the pairwise program
(``jax.jit(f).lower(...).compile().memory_analysis()``): ``temp_size_in_bytes`` is the scratch
memory the program needs beyond its arguments and outputs, i.e. what chunking bounds. This is
the compiler's static plan, not a process measurement (process RSS cannot separate variants run
in one process: its peak only grows).

    python benchmarks/lmc.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import import_torch, print_table, time_interleaved, write_json  # noqa: E402
from tna_jax import chunking, evaluation, lmc, models  # noqa: E402
from tna_jax import tree as tree_lib  # noqa: E402


def problem(width: int, depth: int, num_models: int, num_examples: int):
    net = models.build({"name": "mlp", "depth": depth, "width": width}, (40,), 10)
    stacked = jax.vmap(net.init)(jax.random.split(jax.random.key(0), num_models))
    x = jax.random.normal(jax.random.key(1), (num_examples, 40))
    y = jax.random.randint(jax.random.key(2), (num_examples,), 0, 10)
    return net, stacked, x, y


def memory(eval_fn, stacked, pairs, alphas, x, y, chunk):
    """XLA's compiled memory plan of the (pair, α) program."""
    k = len(alphas)
    ii = jnp.asarray([p[0] for p in pairs], jnp.int32)
    jj = jnp.asarray([p[1] for p in pairs], jnp.int32)
    pi = jnp.repeat(jnp.arange(len(pairs), dtype=jnp.int32), k)
    al = jnp.tile(jnp.asarray(alphas, jnp.float32), len(pairs))
    program = lmc.pairs.pairs_program(eval_fn, chunk, True)
    stats = program.lower(stacked, ii, jj, pi, al, x, y).compile().memory_analysis()
    return {"temp_MB": stats.temp_size_in_bytes / 2**20, "argument_MB": stats.argument_size_in_bytes / 2**20,
            "output_MB": stats.output_size_in_bytes / 2**20}


def torch_loop_fn(models_list, pairs, alphas, x, y):
    """PyTorch reference: interpolate the state dicts, evaluate, for every pair and α."""
    torch = import_torch()

    torch.set_num_threads(os.cpu_count() or 1)

    def to_torch(params):
        names = sorted(params, key=lambda n: (n == "head", n))  # dense_0, dense_1, ..., head
        return [(torch.tensor(np.asarray(params[n]["kernel"]).T.copy()), torch.tensor(np.asarray(params[n]["bias"])))
                for n in names]

    layers = [to_torch(m["params"]) for m in models_list]
    xt, yt = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y), dtype=torch.long)

    def forward(weights):
        h = xt
        for i, (w, b) in enumerate(weights):
            h = torch.nn.functional.linear(h, w, b)
            if i < len(weights) - 1:
                h = torch.relu(h)
        return h

    def run():
        out = []
        with torch.no_grad():
            for i, j in pairs:
                for t in alphas:
                    weights = [((1 - t) * wa + t * wb, (1 - t) * ba + t * bb)
                               for (wa, ba), (wb, bb) in zip(layers[i], layers[j])]
                    logits = forward(weights)
                    out.append((float(torch.nn.functional.cross_entropy(logits, yt)),
                                float((logits.argmax(1) == yt).float().mean())))
        return out

    return run


def measure(width: int, num_examples: int, rounds: int, with_torch: bool) -> dict:
    """All variants on one problem size; returns rows, ratios and the auto chunk."""
    num_models, num_alphas, eval_batch = 5, 25, 1000
    net, stacked, x, y = problem(width, 2, num_models, num_examples)
    eval_fn = evaluation.make_eval_fn(net, eval_batch)
    pairs = lmc.all_pairs(num_models)  # 10 pairs
    alphas = lmc.default_alphas(num_alphas)
    models_list = tree_lib.unstack(stacked)

    point = jax.jit(lambda a, b, alpha: eval_fn(lmc.interpolate(a, b, alpha), x, y))

    def python_loop():
        out = [point(models_list[i], models_list[j], jnp.float32(t)) for i, j in pairs for t in alphas]
        return jax.block_until_ready(out)

    def pairwise(chunk):
        return lambda: lmc.pairwise_barriers(eval_fn, stacked, (x, y), pairs=pairs, alphas=alphas,
                                             chunk=chunk).paths.loss

    variants = {"python loop": python_loop, "vmapped, chunk=auto (default)": pairwise("auto"),
                "vmapped, chunk=None (all at once)": pairwise(None), "vmapped, chunk=25": pairwise(25)}
    # Same numbers every way (the loop is the reference).
    ref = np.array([float(p["loss"]) for p in python_loop()]).reshape(len(pairs), num_alphas)
    for name, fn in variants.items():
        if name != "python loop":
            np.testing.assert_allclose(fn(), ref, rtol=1e-5, err_msg=name)
    if with_torch:
        try:
            torch_loop = torch_loop_fn(models_list, pairs, alphas, x, y)
            np.testing.assert_allclose([p[0] for p in torch_loop()], ref.reshape(-1), rtol=1e-4)
            variants["PyTorch loop"] = torch_loop
        except ImportError:
            print("torch not installed (pip install 'tna_jax[bench]'): skipping the PyTorch comparison")
    times = time_interleaved(variants, rounds=rounds, warmup=1)
    base = times["python loop"]["median_s"]
    auto = chunking.auto_chunk(lambda t: eval_fn(lmc.interpolate(models_list[0], models_list[1], t), x, y),
                          jnp.zeros(len(pairs) * num_alphas))
    mem = {"vmapped, chunk=auto (default)": memory(eval_fn, stacked, pairs, alphas, x, y, "auto"),
           "vmapped, chunk=None (all at once)": memory(eval_fn, stacked, pairs, alphas, x, y, None),
           "vmapped, chunk=25": memory(eval_fn, stacked, pairs, alphas, x, y, 25)}
    rows = []
    for name in ("python loop", "PyTorch loop", *mem):
        if name not in times:
            continue
        row = {"problem": f"w={width}, n={num_examples}", "variant": name, "points": len(pairs) * num_alphas,
               "median_ms": times[name]["median_s"] * 1e3, "min_ms": times[name]["min_s"] * 1e3,
               "speedup_vs_loop": base / times[name]["median_s"]}
        if name in mem:
            row.update({"xla_temp_MB": mem[name]["temp_MB"], "xla_args_MB": mem[name]["argument_MB"]})
        rows.append(row)
    default = times["vmapped, chunk=auto (default)"]["median_s"]
    return {"rows": rows, "auto_chunk": auto, "params_per_model": net.param_count(),
            "vmap_speedup": base / default,
            "vmap_all_at_once_speedup": base / times["vmapped, chunk=None (all at once)"]["median_s"],
            "torch_ratio": times["PyTorch loop"]["median_s"] / default if "PyTorch loop" in times else None}


# (width, examples): the target applies to small nets, where a loop pays mostly for dispatch;
# the MNIST-1D size (the quickstart's test split) is compute-bound and reported beside it.
PROBLEMS = {"small": (32, 256), "mnist1d": (128, 1000)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--out", default=None, help="results directory")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 7
    results = {name: measure(w, n, rounds, with_torch=True) for name, (w, n) in PROBLEMS.items()}
    rows = [r for res in results.values() for r in res["rows"]]
    table = print_table(rows, ["problem", "variant", "points", "median_ms", "min_ms", "speedup_vs_loop",
                               "xla_temp_MB", "xla_args_MB"])
    for name, res in results.items():
        print(f"{name}: auto chunk = {res['auto_chunk']} points; vmapped (auto) vs loop {res['vmap_speedup']:.2f}x")
    small, big = results["small"], results["mnist1d"]
    write_json("lmc", {
        "quick": args.quick,
        "setup": {"model": "mlp depth 2", "problems": {k: {"width": w, "examples": n} for k, (w, n) in PROBLEMS.items()},
                  "models": 5, "pairs": 10, "alphas": 25, "rounds": rounds,
                  "auto_chunk": {k: r["auto_chunk"] for k, r in results.items()}},
        "rows": rows, "table": table, "target_speedup": 5.0,
        "ratios": {"vmap_speedup": small["vmap_speedup"], "torch_ratio": small["torch_ratio"],
                   "vmap_speedup_mnist1d": big["vmap_speedup"],
                   "vmap_all_at_once_speedup_mnist1d": big["vmap_all_at_once_speedup"],
                   "torch_ratio_mnist1d": big["torch_ratio"]},
        "note": "small = MLP 40-32-32-10 on 256 examples (dispatch-bound: the target applies); mnist1d = "
                "MLP 40-128-128-10 on 1000 examples (compute-bound on 2 cores: a loop of jitted points is "
                "already near the matmul rate, so vmapping can only remove dispatch). chunk=auto keeps each "
                "chunk's activations cache-sized (tna_jax.chunking.auto_chunk).",
        "memory_note": "XLA compiled memory analysis (temp_size_in_bytes: scratch beyond arguments and outputs); "
                       "a static plan, not process RSS.",
    }, args.out)


if __name__ == "__main__":
    main()
