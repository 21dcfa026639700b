"""Step-time overhead of ``fixed_anchor_mask`` chained after ``optax.adamw``.

Measures, in one process and interleaved, one training step (forward, backward, optimizer) of
  * ``adamw`` alone,
  * ``chain(adamw, fixed_anchor_mask(0.4, key))`` (the mask stored in the state: what we ship),
  * ``chain(adamw, fixed_anchor_mask(0.4, key, values=shared))`` (shared anchor values: the update
    also reads the values and the params),
  * ``chain(adamw, regenerate)``: a variant that redraws the mask from the key at every step,
  * ``chain(adamw, read_values)``: the floor of any update that reads a params-sized tree of values
    at every step (``where(mask, values, u)``, not exact: a timing floor only),
on a ~10M-parameter MLP (and on ResNet-20 when ``tna_jax.models`` provides it), and reports the
overhead ratios and the optimizer-state bytes of each. Target: stored-mask overhead <= 3%.

    python benchmarks/anchor_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from benchmarks.common import print_table, time_interleaved, write_json  # noqa: E402
from tna_jax import anchors, tree  # noqa: E402


def regenerate_mask(ratio: float, key: jax.Array) -> optax.GradientTransformation:
    """The alternative design: keep only the key and redraw the mask at every update."""

    def init_fn(params):
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        mask = anchors.anchor_mask(updates, ratio, key)
        return jax.tree.map(lambda u, m: jnp.where(m, 0, u), updates, mask), state

    return optax.GradientTransformation(init_fn, update_fn)


def read_values(mask, values) -> optax.GradientTransformation:
    """The timing floor of reading stored values at every update: one select against one more tree."""

    def init_fn(params):
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        return jax.tree.map(lambda u, m, v: jnp.where(m, v.astype(u.dtype), u), updates, mask, values), state

    return optax.GradientTransformation(init_fn, update_fn)


def mlp_problem(width: int, depth: int, in_dim: int, batch: int):
    key = jax.random.key(0)
    sizes = [in_dim] + [width] * depth + [10]
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        k = jax.random.fold_in(key, i)
        params[f"dense_{i}"] = {"kernel": jax.random.normal(k, (a, b)) / a**0.5, "bias": jnp.zeros((b,))}
    x = jax.random.normal(jax.random.key(1), (batch, in_dim))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)

    def loss_fn(p, batch_stats=None):
        h = x
        for i in range(len(sizes) - 1):
            h = h @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"]
            if i < len(sizes) - 2:
                h = jax.nn.relu(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean(), batch_stats

    return params, None, loss_fn


def resnet_problem(batch: int):
    from tna_jax import models

    net = models.build({"name": "resnet20", "width": 1.0, "norm": "batch"}, (32, 32, 3), 10)
    variables = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (batch, 32, 32, 3))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)

    def loss_fn(p, batch_stats):
        logits, new_state = net.apply({"params": p, **batch_stats}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

    state = {k: v for k, v in variables.items() if k != "params"}
    return variables["params"], state, loss_fn


def make_step(loss_fn, tx):
    # Buffers are donated, as in tna_jax.training: the update is written in place.
    @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
    def step(params, opt_state, batch_stats):
        (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_bs

    return step


def bench_model(name, params, batch_stats, loss_fn, rounds):
    key = jax.random.key(42)
    shared = jax.tree.map(lambda p: p * 0.5, params)  # anchor values of another "init"
    variants = {
        "adamw": optax.adamw(1e-3, weight_decay=1e-4),
        "adamw+anchors(stored)": optax.chain(optax.adamw(1e-3, weight_decay=1e-4), anchors.fixed_anchor_mask(0.4, key)),
        "adamw+anchors(shared values)": optax.chain(optax.adamw(1e-3, weight_decay=1e-4),
                                                    anchors.fixed_anchor_mask(0.4, key, values=shared)),
        "adamw+anchors(regenerated)": optax.chain(optax.adamw(1e-3, weight_decay=1e-4), regenerate_mask(0.4, key)),
        "adamw+read(values) [floor]": optax.chain(optax.adamw(1e-3, weight_decay=1e-4),
                                                  read_values(anchors.anchor_mask(params, 0.4, key), shared)),
    }
    fns, state_bytes = {}, {}
    for vname, tx in variants.items():
        step = make_step(loss_fn, tx)
        opt_state = tx.init(params)
        state_bytes[vname] = tree.tree_bytes(opt_state)
        holder = {"p": jax.tree.map(jnp.copy, params), "s": opt_state, "b": jax.tree.map(jnp.copy, batch_stats)}

        def run(step=step, holder=holder):
            holder["p"], holder["s"], holder["b"] = step(holder["p"], holder["s"], holder["b"])
            return holder["p"]

        fns[vname] = run
    times = time_interleaved(fns, rounds=rounds, inner=3, warmup=2)
    base = times["adamw"]["median_s"]
    rows = []
    for vname in variants:
        rows.append({
            "model": name,
            "variant": vname,
            "params": tree.tree_size(params),
            "step_ms": times[vname]["median_s"] * 1e3,
            "min_step_ms": times[vname]["min_s"] * 1e3,
            "overhead_%": (times[vname]["median_s"] / base - 1) * 100,
            "opt_state_MB": state_bytes[vname] / 2**20,
        })
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller models and fewer rounds")
    parser.add_argument("--out", default=None, help="results directory")
    args = parser.parse_args(argv)
    rounds = 5 if args.quick else 21
    width = 512 if args.quick else 2048
    rows = bench_model("mlp", *mlp_problem(width, 3, 1024, 128), rounds)
    if not args.quick:
        rows += bench_model("resnet20", *resnet_problem(64), rounds)
    table = print_table(rows, ["model", "variant", "params", "step_ms", "min_step_ms", "overhead_%", "opt_state_MB"])
    stored = [r for r in rows if r["variant"] == "adamw+anchors(stored)"]
    shared = [r for r in rows if r["variant"] == "adamw+anchors(shared values)"]
    floor = {r["model"]: r for r in rows if r["variant"] == "adamw+read(values) [floor]"}
    write_json("anchor_overhead", {
        "quick": args.quick,
        "rows": rows,
        "table": table,
        "target_overhead_percent": 3.0,
        "ratios": {**{f"{r['model']}_stored_over_adamw": 1 + r["overhead_%"] / 100 for r in stored},
                   **{f"{r['model']}_adamw_over_stored": 1 / (1 + r["overhead_%"] / 100) for r in stored},
                   **{f"{r['model']}_adamw_over_shared_values": 1 / (1 + r["overhead_%"] / 100) for r in shared},
                   **{f"{r['model']}_floor_over_shared_values": (1 + floor[r["model"]]["overhead_%"] / 100)
                      / (1 + r["overhead_%"] / 100) for r in shared}},
    }, args.out)


if __name__ == "__main__":
    main()
