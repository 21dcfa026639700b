"""LMC paths vmapped over (pair, α) against a Python loop, and the memory that chunking saves.

In one process, interleaved (benchmarks.common.time_interleaved), for 10 pairs of 5 MNIST-1D-
sized MLPs and 25 α each (250 interpolated models evaluated on 1000 examples):

  * ``vmapped``: :func:`tna_jax.lmc.pairwise_barriers` (one compiled program, all 250 points),
  * ``vmapped, chunk=25``: the same with ``chunk=25`` (``lax.map`` over blocks of 25 points),
  * ``python loop``: a loop over pairs and α calling one jitted "interpolate, then evaluate"
    function per point, with the same ``eval_fn`` (results collected, one sync at the end);
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

from benchmarks.common import print_table, time_interleaved, write_json  # noqa: E402
from tna_jax import lmc, models, training  # noqa: E402
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
    program = lmc._pairs_program(eval_fn, chunk, True)
    stats = program.lower(stacked, ii, jj, pi, al, x, y).compile().memory_analysis()
    return {"temp_MB": stats.temp_size_in_bytes / 2**20, "argument_MB": stats.argument_size_in_bytes / 2**20,
            "output_MB": stats.output_size_in_bytes / 2**20}


def torch_loop_fn(models_list, pairs, alphas, x, y):
    """PyTorch reference: interpolate the state dicts, evaluate, for every pair and α."""
    import torch

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--out", default=None, help="results directory")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 7
    num_models, num_alphas, num_examples, eval_batch = 5, 25, 1000, 1000
    net, stacked, x, y = problem(args.width, 2, num_models, num_examples)
    eval_fn = training.make_eval_fn(net, eval_batch)
    pairs = lmc.all_pairs(num_models)  # 10 pairs
    alphas = lmc.default_alphas(num_alphas)
    models_list = tree_lib.unstack(stacked)

    point = jax.jit(lambda a, b, alpha: eval_fn(lmc.interpolate(a, b, alpha), x, y))

    def python_loop():
        out = [point(models_list[i], models_list[j], jnp.float32(t)) for i, j in pairs for t in alphas]
        return jax.block_until_ready(out)

    def vmapped():
        return lmc.pairwise_barriers(eval_fn, stacked, (x, y), pairs=pairs, alphas=alphas)["paths"]["loss"]

    def vmapped_chunked():
        return lmc.pairwise_barriers(eval_fn, stacked, (x, y), pairs=pairs, alphas=alphas, chunk=25)["paths"]["loss"]

    # Same numbers three ways (the loop is the reference).
    ref = np.array([float(p["loss"]) for p in python_loop()]).reshape(len(pairs), num_alphas)
    np.testing.assert_allclose(vmapped(), ref, rtol=1e-5)
    np.testing.assert_allclose(vmapped_chunked(), ref, rtol=1e-5)

    variants = {"python loop": python_loop, "vmapped": vmapped, "vmapped, chunk=25": vmapped_chunked}
    try:
        torch_loop = torch_loop_fn(models_list, pairs, alphas, x, y)
        np.testing.assert_allclose([p[0] for p in torch_loop()], ref.reshape(-1), rtol=1e-4)
        variants["PyTorch loop"] = torch_loop
    except ImportError:
        print("torch not installed (pip install 'tna_jax[bench]'): skipping the PyTorch comparison")
    times = time_interleaved(variants, rounds=rounds, warmup=1)
    base = times["python loop"]["median_s"]
    rows = []
    mem = {"vmapped": memory(eval_fn, stacked, pairs, alphas, x, y, None),
           "vmapped, chunk=25": memory(eval_fn, stacked, pairs, alphas, x, y, 25),
           "vmapped, chunk=5": memory(eval_fn, stacked, pairs, alphas, x, y, 5)}
    for name in ("python loop", "PyTorch loop", "vmapped", "vmapped, chunk=25", "vmapped, chunk=5"):
        if name not in times and name not in mem:
            continue
        row = {"variant": name, "points": len(pairs) * num_alphas}
        if name in times:
            row.update({"median_ms": times[name]["median_s"] * 1e3, "min_ms": times[name]["min_s"] * 1e3,
                        "speedup_vs_loop": base / times[name]["median_s"]})
        if name in mem:
            row.update({"xla_temp_MB": mem[name]["temp_MB"], "xla_args_MB": mem[name]["argument_MB"]})
        rows.append(row)
    table = print_table(rows, ["variant", "points", "median_ms", "min_ms", "speedup_vs_loop", "xla_temp_MB",
                               "xla_args_MB"])
    write_json("lmc", {
        "quick": args.quick,
        "setup": {"model": f"mlp depth 2 width {args.width}", "params_per_model": net.param_count(),
                  "models": num_models, "pairs": len(pairs), "alphas": num_alphas, "examples": num_examples,
                  "eval_batch": eval_batch, "rounds": rounds},
        "rows": rows, "table": table, "target_speedup": 5.0,
        "speedup_vmapped_over_loop": base / times["vmapped"]["median_s"],
        "ratios": {"vmap_speedup": base / times["vmapped"]["median_s"],
                   "torch_ratio": (times["PyTorch loop"]["median_s"] / times["vmapped"]["median_s"]
                                   if "PyTorch loop" in times else None)},
        "memory_note": "XLA compiled memory analysis (temp_size_in_bytes: scratch beyond arguments and outputs); "
                       "a static plan, not process RSS.",
    }, args.out)


if __name__ == "__main__":
    main()
