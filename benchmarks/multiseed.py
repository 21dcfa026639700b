"""Multi-seed training throughput: seeds vmapped + scanned vs one after another, vs PyTorch, vs
the machine's matmul peak, and how step time and memory grow with the number of seeds.

All figures come from one process, variants interleaved, so the ratios are what to read:

* ``vmap_speedup``: 8 seeds in one vmapped, scanned epoch vs the same 8 trained one after another
  with the same code (target >= 3x for the MNIST-1D MLP on 2 CPU cores);
* ``torch_ratio``: our samples/s vs a plain PyTorch CPU loop of the same MLP, data, batch size and
  optimizer (8 seeds, sequential, anchors as a gradient mask; target >= 1.5x);
* ``peak_fraction``: achieved training GFLOP/s (analytic count: 3x the forward matmuls) over the
  measured peak of a large f32 matmul;
* scaling: epoch time and XLA's memory estimate for N = 1, 2, 4, 8, 16, 32 seeds.

    python benchmarks/multiseed.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # As train.py does: one CPU device per core, so sharded seeds use every core.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={min(8, os.cpu_count() or 1)}").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import import_torch, print_table, time_interleaved, write_json  # noqa: E402
from benchmarks.harness import Trainer, matmul_peak_gflops, train_flops_per_example  # noqa: E402
from tna_jax import data as data_lib  # noqa: E402
from tna_jax import evaluation, models  # noqa: E402
from tna_jax.config import default_config  # noqa: E402

WIDTH, DEPTH, BATCH, LR = 256, 2, 64, 0.05


def make_config(num_seeds: int, seed: int = 0):
    c = default_config()
    c.seed = seed
    c.num_seeds = num_seeds
    c.model.depth, c.model.width = DEPTH, WIDTH
    c.optimizer.name, c.optimizer.learning_rate = "momentum", LR
    c.train.batch_size = BATCH
    c.anchor.ratio, c.baseline = 0.4, False
    return c


class PythonLoopTrainer:
    """The usual peer pattern (Flax's MNIST example): one jitted step per batch, batches sliced
    on the host and copied to the device, a Python loop over steps and over seeds."""

    def __init__(self, num_seeds: int, dataset):
        import optax

        from tna_jax import anchors

        c = make_config(1)
        self.net = models.build(c.model, dataset.input_shape, dataset.num_classes)
        d = data_lib.to_device(dataset)
        self.x, self.y = np.asarray(d.x_train), np.asarray(d.y_train)
        self.tx = optax.chain(optax.sgd(LR, momentum=0.9), anchors.fixed_anchor_mask(0.4, jax.random.key(1)))
        self.models = []
        for s in range(num_seeds):
            params = self.net.init(jax.random.key(s))["params"]
            self.models.append([params, self.tx.init(params)])
        net, tx = self.net, self.tx

        @jax.jit
        def step(params, opt_state, x, y):
            def loss_fn(p):
                logits, _ = net.apply({"params": p}, x, train=True)
                return evaluation.cross_entropy(logits, y).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.step = step
        self.rng = np.random.default_rng(0)

    def run_epoch(self):
        n = len(self.y)
        loss = None
        for m in self.models:
            perm = self.rng.permutation(n)
            for i in range(n // BATCH):
                idx = perm[i * BATCH:(i + 1) * BATCH]
                m[0], m[1], loss = self.step(m[0], m[1], self.x[idx], self.y[idx])
        return loss


def torch_epoch_fn(dataset, num_seeds: int):
    """A plain PyTorch loop: for each seed, an epoch of SGD-momentum over shuffled batches."""
    torch = import_torch()

    torch.set_num_threads(os.cpu_count() or 1)
    d = data_lib.to_device(dataset)
    x = torch.tensor(np.asarray(d.x_train))
    y = torch.tensor(np.asarray(d.y_train), dtype=torch.long)
    models_, opts, masks = [], [], []
    for s in range(num_seeds):
        torch.manual_seed(s)
        layers, prev = [], x.shape[1]
        for _ in range(DEPTH):
            layers += [torch.nn.Linear(prev, WIDTH), torch.nn.ReLU()]
            prev = WIDTH
        layers.append(torch.nn.Linear(prev, dataset.num_classes))
        m = torch.nn.Sequential(*layers)
        models_.append(m)
        opts.append(torch.optim.SGD(m.parameters(), lr=LR, momentum=0.9))
        gen = torch.Generator().manual_seed(1234)
        masks.append([(torch.rand(p.shape, generator=gen) >= 0.4).float() for p in m.parameters()])
    loss_fn = torch.nn.CrossEntropyLoss()
    n = x.shape[0]
    steps = n // BATCH

    def epoch():
        total = 0.0
        for m, opt, keep in zip(models_, opts, masks):
            perm = torch.randperm(n)
            for i in range(steps):
                idx = perm[i * BATCH:(i + 1) * BATCH]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(m(x[idx]), y[idx])
                loss.backward()
                for p, k in zip(m.parameters(), keep):
                    p.grad.mul_(k)
                opt.step()
                total += float(loss.detach())
        return total

    return epoch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else 7
    dataset = data_lib.load({"source": "mnist1d"})
    n_train = len(dataset.y_train)

    # 1. vmapped+scanned 8 seeds vs 8 sequential single-seed trainings (same code).
    together = Trainer(make_config(8), dataset, shard=True)
    singles = [Trainer(make_config(1), dataset)]
    singles += [Trainer(make_config(1, seed=s), dataset, like=singles[0]) for s in range(1, 8)]
    compile_s = together.compile_s
    peer = PythonLoopTrainer(8, dataset)
    fns = {"8 seeds vmapped": together.run_epoch,
           "8 seeds one after another": lambda: [t.run_epoch() for t in singles][-1],
           "8 seeds, jitted step + Python loop": peer.run_epoch}
    torch_ok = False
    if not args.no_torch:
        try:
            fns["PyTorch, 8 seeds"] = torch_epoch_fn(dataset, 8)
            torch_ok = True
        except ImportError:
            print("torch not installed (pip install 'tna_jax[bench]'): skipping the PyTorch comparison")
    times = time_interleaved(fns, rounds=rounds, warmup=1)
    samples = 8 * together.steps * BATCH
    rows = [{"variant": k, "epoch_s": v["median_s"], "samples_per_s": samples / v["median_s"]} for k, v in times.items()]
    vmap_speedup = times["8 seeds one after another"]["median_s"] / times["8 seeds vmapped"]["median_s"]
    loop_speedup = times["8 seeds, jitted step + Python loop"]["median_s"] / times["8 seeds vmapped"]["median_s"]
    torch_ratio = (times["PyTorch, 8 seeds"]["median_s"] / times["8 seeds vmapped"]["median_s"]) if torch_ok else None
    table = print_table(rows, ["variant", "epoch_s", "samples_per_s"])

    # 2. Fraction of the matmul peak.
    peak = matmul_peak_gflops(1024 if args.quick else 2048)
    flops = train_flops_per_example(together.net, dataset.input_shape)
    achieved = samples * flops / times["8 seeds vmapped"]["median_s"] / 1e9
    print(f"compile (first call) {compile_s:.2f} s vs steady-state epoch {times['8 seeds vmapped']['median_s']:.3f} s")
    print(f"matmul peak {peak:.1f} GFLOP/s; training achieves {achieved:.2f} GFLOP/s = {100 * achieved / peak:.1f}% of it")

    # 3. Scaling with N.
    scaling = []
    reuse = {8: together} if args.quick else {}  # quick (the CI guard): no new programs to compile
    for n in ([1, 8] if args.quick else [1, 2, 4, 8, 16, 32]):
        t = reuse.get(n) or Trainer(make_config(n), dataset, shard=True)
        tt = time_interleaved({"x": t.run_epoch}, rounds=rounds, warmup=1)["x"]["median_s"]
        scaling.append({"seeds": n, "epoch_s": tt, "step_ms": 1e3 * tt / t.steps,
                        "per_seed_epoch_s": tt / n, "memory_MB": (t.memory_bytes() or 0) / 2**20})
    print_table(scaling, ["seeds", "epoch_s", "step_ms", "per_seed_epoch_s", "memory_MB"])
    seq_per_seed = times["8 seeds one after another"]["median_s"] / 8
    payload = {
        "quick": args.quick, "model": f"mlp depth {DEPTH} width {WIDTH}", "batch_size": BATCH,
        "train_examples": n_train, "rows": rows, "scaling": scaling, "table": table,
        "sequential_epoch_s_per_seed": seq_per_seed,
        "matmul_peak_gflops": peak, "achieved_gflops": achieved, "peak_fraction": achieved / peak,
        "devices": jax.device_count(),
        "compile_s_8_seeds": compile_s, "steady_epoch_s_8_seeds": times["8 seeds vmapped"]["median_s"],
        "ratios": {"vmap_speedup_8_seeds": vmap_speedup, "torch_ratio_samples_per_s": torch_ratio,
                   "speedup_vs_python_step_loop": loop_speedup},
        "targets": {"vmap_speedup_8_seeds": 3.0, "torch_ratio_samples_per_s": 1.5},
    }
    print(f"vmap speedup (8 seeds): {vmap_speedup:.2f}x (target 3x); vs a jitted step in a Python loop: "
          f"{loop_speedup:.2f}x; "
          + (f"vs PyTorch: {torch_ratio:.2f}x (target 1.5x)" if torch_ratio else "PyTorch: skipped"))
    write_json("multiseed", payload, args.out)
    if not args.quick:
        from tna_jax import plotting

        plotting.plot_curves(
            {"vmapped (per seed)": {"x": [s["seeds"] for s in scaling], "y": [s["per_seed_epoch_s"] for s in scaling]},
             "one after another (per seed)": {"x": [s["seeds"] for s in scaling], "y": [seq_per_seed] * len(scaling)}},
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "multiseed_scaling.png"),
            xlabel="seeds trained at once", ylabel="epoch seconds per seed",
            title="MNIST-1D MLP: cost per seed vs seeds in one program", xscale="log2")


if __name__ == "__main__":
    main()
