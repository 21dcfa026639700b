"""ResNet-20 training throughput: seeds vmapped vs one after another, vs PyTorch, vs the
machine's matmul peak, compile time vs steady state, and how cost grows with the seed count.

All numbers come from one process with the variants interleaved, so the ratios are what to read:

* ``together_speedup``: N seeds in one program, mapped as ``training.fit`` maps them
  (``train.run_axis="auto"``: a loop over runs on CPU, vmap on GPU/TPU), vs the same N trained
  one after another with the same code; ``vmap_speedup``: the same with the runs forced through
  ``jax.vmap``; ``loop_vs_vmap``: the first over the second (on CPU this is why "auto" loops);
* ``torch_ratio_1_seed``: our samples/s training one ResNet-20 at a time vs a plain PyTorch CPU
  loop of the same network (BatchNorm, 1x1 projection shortcuts), batch size and optimizer
  (target >= 1x); also ``torch_ratio_n_seeds`` with our N seeds vmapped against N PyTorch models
  one after another;
* ``peak_fraction``: achieved GFLOP/s (analytic conv/matmul count from the jaxpr, x3 for the
  backward pass) over the measured peak of a large float32 matmul;
* compile (first call) vs steady-state epoch seconds; scaling for N = 1, 2, 4, 8, 16, 32 seeds.

The images are random (32x32x3, 10 classes): throughput does not depend on what they show, and
nothing has to be downloaded.

    python benchmarks/resnet20.py [--quick] [--no-torch]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={min(8, os.cpu_count() or 1)}").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import import_torch, print_table, time_interleaved, write_json  # noqa: E402
from benchmarks.harness import Trainer, matmul_peak_gflops, train_flops_per_example  # noqa: E402
from tna_jax import data as data_lib  # noqa: E402
from tna_jax.config import default_config  # noqa: E402

BATCH, LR, MOMENTUM = 32, 0.05, 0.9


def random_images(num_train: int) -> data_lib.Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_train + 64, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 10, size=num_train + 64).astype(np.int32)
    return data_lib.Dataset("random_images", x[:num_train], y[:num_train], x[num_train:num_train + 32],
                            y[num_train:num_train + 32], x[-32:], y[-32:], 10, kind="image").validate()


def make_config(num_seeds: int, seed: int = 0, run_axis: str = "auto"):
    c = default_config()
    c.train.run_axis = run_axis
    c.seed, c.num_seeds, c.baseline = seed, num_seeds, False
    c.model = {"name": "resnet20", "width": 1.0, "norm": "batch"}
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.momentum = "momentum", LR, MOMENTUM
    c.train.batch_size = BATCH
    c.anchor.ratio = 0.4
    return c


def torch_epoch_fn(dataset: data_lib.Dataset, num_seeds: int):
    """One epoch of SGD-momentum for `num_seeds` PyTorch ResNet-20s, one after another."""
    torch = import_torch()
    from torch import nn

    torch.set_num_threads(os.cpu_count() or 1)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                             if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    def resnet20():
        layers, cin = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
        for s, c in enumerate((16, 32, 64)):
            for b in range(3):
                layers.append(Block(cin, c, 2 if s > 0 and b == 0 else 1))
                cin = c
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    d = data_lib.to_device(dataset)
    x = torch.tensor(np.asarray(d.x_train)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(np.asarray(d.y_train), dtype=torch.long)
    nets, opts, masks = [], [], []
    for s in range(num_seeds):
        torch.manual_seed(s)
        net = resnet20()
        nets.append(net)
        opts.append(torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM))
        gen = torch.Generator().manual_seed(1234)
        masks.append([(torch.rand(p.shape, generator=gen) >= 0.4).float() for p in net.parameters()])
    loss_fn = nn.CrossEntropyLoss()
    n = x.shape[0]

    def epoch():
        total = 0.0
        for net, opt, keep in zip(nets, opts, masks):
            net.train()
            perm = torch.randperm(n)
            for i in range(n // BATCH):
                idx = perm[i * BATCH:(i + 1) * BATCH]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(x[idx]), y[idx])
                loss.backward()
                for p, k in zip(net.parameters(), keep):  # anchors: masked gradient, as TNA-PFN
                    p.grad.mul_(k)
                opt.step()
                total += float(loss.detach())
        return total

    return epoch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer examples, seeds and rounds")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--seeds", type=int, default=None, help="seeds in the vmapped-vs-sequential comparison")
    parser.add_argument("--out", default=None, help="results directory")
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else 5
    num_seeds = args.seeds or (2 if args.quick else 4)
    dataset = random_images(64)  # two steps of 32 per epoch: step time is what is measured

    together = Trainer(make_config(num_seeds), dataset, shard=True)
    vmapped = Trainer(make_config(num_seeds, run_axis="vmap"), dataset, shard=True)
    singles = [Trainer(make_config(1), dataset)]
    singles += [Trainer(make_config(1, seed=s), dataset, like=singles[0]) for s in range(1, num_seeds)]
    compile_s = together.compile_s
    tg = f"{num_seeds} seeds in one program ({together.run_axis})"
    vm, seq, pt = f"{num_seeds} seeds vmapped", f"{num_seeds} seeds one after another", f"PyTorch, {num_seeds} seeds"
    fns = {tg: together.run_epoch, vm: vmapped.run_epoch, seq: lambda: [t.run_epoch() for t in singles][-1]}
    if together.run_axis == "vmap":  # accelerators: the two are the same program
        del fns[vm]
        vm = tg
    torch_ok = not args.no_torch
    if torch_ok:
        try:
            fns[pt] = torch_epoch_fn(dataset, num_seeds)
        except ImportError:
            torch_ok = False
            print("torch not installed (pip install 'tna_jax[bench]'): skipping the PyTorch comparison")
    times = time_interleaved(fns, rounds=rounds, warmup=1)
    med = {k: v["median_s"] for k, v in times.items()}
    per_seed_samples = together.steps * BATCH
    rows = [{"variant": k, "epoch_s": v, "samples_per_s": per_seed_samples * num_seeds / v} for k, v in med.items()]
    table = print_table(rows, ["variant", "epoch_s", "samples_per_s"])
    together_speedup, vmap_speedup = med[seq] / med[tg], med[seq] / med[vm]
    # One model at a time on both sides (same work, same order): the per-model comparison.
    torch_1 = med[pt] / med[seq] if torch_ok else None
    torch_n = med[pt] / med[tg] if torch_ok else None

    peak = matmul_peak_gflops(1024 if args.quick else 2048)
    flops = train_flops_per_example(together.net, dataset.input_shape)
    achieved = num_seeds * per_seed_samples * flops / min(med[tg], med[seq]) / 1e9
    print(f"compile (first call) {compile_s:.2f} s (forced vmap {vmapped.compile_s:.2f} s) vs steady-state "
          f"epoch {med[tg]:.3f} s")
    print(f"matmul peak {peak:.1f} GFLOP/s; ResNet-20 training achieves {achieved:.2f} GFLOP/s "
          f"= {100 * achieved / peak:.1f}% of it ({flops / 3e6:.1f} MFLOP forward per example)")

    scaling = []
    seq_per_seed = med[seq] / num_seeds
    reuse = {1: singles[0], num_seeds: together}
    for n in ([1, num_seeds] if args.quick else [1, 2, 4, 8, 16, 32]):
        t = reuse.get(n) or Trainer(make_config(n), dataset, shard=True)
        tt = time_interleaved({"x": t.run_epoch}, rounds=1 if n >= 16 else rounds, warmup=1)["x"]["median_s"]
        scaling.append({"seeds": n, "epoch_s": tt, "step_ms": 1e3 * tt / t.steps, "per_seed_epoch_s": tt / n,
                        "speedup_vs_sequential": seq_per_seed * n / tt, "memory_MB": (t.memory_bytes() or 0) / 2**20})
    print_table(scaling, ["seeds", "epoch_s", "step_ms", "per_seed_epoch_s", "speedup_vs_sequential", "memory_MB"])
    payload = {
        "quick": args.quick, "model": "resnet20 width 1, BatchNorm", "batch_size": BATCH,
        "train_examples": len(dataset.y_train), "seeds": num_seeds, "rows": rows, "scaling": scaling,
        "compile_s": compile_s, "compile_s_vmap": vmapped.compile_s, "steady_epoch_s": med[tg], "table": table,
        "run_axis": together.run_axis,
        "matmul_peak_gflops": peak, "achieved_gflops": achieved, "peak_fraction": achieved / peak,
        "forward_mflop_per_example": flops / 3e6, "devices": jax.device_count(),
        "ratios": {"together_speedup": together_speedup, "vmap_speedup": vmap_speedup,
                   "loop_vs_vmap": med[vm] / med[tg], "torch_ratio_1_seed": torch_1, "torch_ratio_n_seeds": torch_n},
        "targets": {"torch_ratio_1_seed": 1.0},
    }
    print(f"{num_seeds} seeds in one program ({together.run_axis}) vs one after another: {together_speedup:.2f}x; "
          f"forced vmap: {vmap_speedup:.2f}x; "
          + (f"vs PyTorch: 1 seed {torch_1:.2f}x (target 1x), {num_seeds} seeds {torch_n:.2f}x" if torch_ok
             else "PyTorch: skipped"))
    write_json("resnet20", payload, args.out)
    if not args.quick:
        from tna_jax import plotting

        xs = [s["seeds"] for s in scaling]
        plotting.plot_curves(
            {f"in one program, {together.run_axis} (per seed)": {"x": xs, "y": [s["per_seed_epoch_s"] for s in scaling]},
             "one after another (per seed)": {"x": xs, "y": [seq_per_seed] * len(xs)}},
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "resnet20_scaling.png"),
            xlabel="seeds trained at once", ylabel="epoch seconds per seed",
            title="ResNet-20: cost per seed vs seeds in one program", xscale="log2")


if __name__ == "__main__":
    main()
