"""TNA-PFN in your own training loop: a Flax Linen MLP of your own, plain optax, one extra line.

Trains `--seeds` MLPs (40-256-256-10, SGD 0.05 with momentum 0.9, batch 128) on MNIST-1D three
ways and prints the linear-mode-connectivity barrier between the seeds:

* plain: no anchors;
* per-model values: `fixed_anchor_mask(ratio, key)`, each model keeps its own init at its anchors
  (the paper's recipe read literally);
* shared values: `fixed_anchor_mask(ratio, key, values=shared_init)`, the anchors hold the same
  values in every model (what TNA-PFN needs).

    python examples/your_own_loop.py [--seeds 3] [--epochs 30] [--ratio 0.4] [--out results.json]

Nothing here uses `train.py`: only `tna_jax.anchors` for the transform and `tna_jax.lmc` to
measure barriers.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tna_jax import anchors, data, lmc  # noqa: E402
from tna_jax.config import default_config  # noqa: E402


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (256, 256):
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


def train_one(params, tx, x, y, epochs, batch_size, key):
    model = MLP()

    @jax.jit
    def step(params, state, xb, yb):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, xb), yb).mean()

        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    steps = x.shape[0] // batch_size
    for epoch in range(epochs):
        order = jax.random.permutation(jax.random.fold_in(key, epoch), x.shape[0])[: steps * batch_size]
        for rows in order.reshape(steps, batch_size):
            params, state = step(params, state, x[rows], y[rows])
    return params, state


def eval_fn(variables, x, y):
    logits = MLP().apply(variables, x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return {"loss": loss.mean(), "accuracy": jnp.mean(jnp.argmax(logits, -1) == y)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    config = default_config()
    config.data.num_samples = 10_000
    splits = data.to_device(data.load(config.data))
    x, y = splits.x_train, splits.y_train
    test = splits.split("test")
    model = MLP()
    init = lambda key: model.init(key, x[:1])["params"]  # noqa: E731
    shared = init(jax.random.key(1000))  # one init, the same in every model
    mask_key = jax.random.key(2000)  # one mask key, the same in every model
    optimizer = lambda: optax.sgd(0.05, momentum=0.9)  # noqa: E731
    arms = {
        "plain": lambda: optimizer(),
        "per-model values": lambda: optax.chain(optimizer(), anchors.fixed_anchor_mask(args.ratio, mask_key)),
        "shared values": lambda: optax.chain(optimizer(), anchors.fixed_anchor_mask(args.ratio, mask_key,
                                                                                   values=shared)),
    }
    results = {}
    for name, make_tx in arms.items():
        t0 = time.time()
        models = []
        for seed in range(args.seeds):
            params, state = train_one(init(jax.random.key(seed)), make_tx(), x, y, args.epochs, 128,
                                      jax.random.key(100 + seed))
            if name != "plain":
                assert bool(anchors.verify(params, state)), "an anchored entry moved"
            models.append({"params": params})
        barriers, accuracies = [], []
        for a, b in itertools.combinations(range(args.seeds), 2):
            path = lmc.lmc_path(eval_fn, models[a], models[b], test)
            bar = lmc.barriers(path)
            barriers.append(100 * bar.accuracy_barrier)
            accuracies.append(100 * bar.avg_endpoint_accuracy)
        results[name] = {"accuracy_barrier_mean": float(np.mean(barriers)),
                         "accuracy_barrier_std": float(np.std(barriers, ddof=1)) if len(barriers) > 1 else None,
                         "endpoint_accuracy_mean": float(np.mean(accuracies)), "pairs": len(barriers),
                         "seconds": time.time() - t0}
        r = results[name]
        print(f"{name:>17}: accuracy barrier {r['accuracy_barrier_mean']:.1f} points over {r['pairs']} pairs "
              f"(endpoint accuracy {r['endpoint_accuracy_mean']:.1f}%)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
